"""Generate `saelens_releases.json.gz` from SAELens's `pretrained_saes.yaml` (MIT, pinned version):

    .venv/bin/python -m hub.registry.build .venv-saelens/lib/python3.11/site-packages/sae_lens

Keeps the releases whose format fast-steer reads (or converts, for pickle-only ones), keyed exactly by
SAELens's release and sae id, and adds what the yaml lacks (format, hook, module, layer, widths,
architecture, k, b_dec on the input, norm scale, Neuronpedia id, pickle). Fields that cannot be known
without downloading a file are null. A field shared by every SAE of a release is stored once on the
release; hooks and paths are stored as templates (`{layer}`, `{id}`) when that makes them shared.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from hub.formats import gemma_scope, llama_scope
from hub.registry import REGISTRY_FILE, SAE_FIELDS

# SAELens converter -> (our format, needs pickle)
FORMATS = {
    None: ("saelens", False),
    "sae_lens": ("saelens", False),
    "gemma_2": ("gemma-scope", False),
    "gemma_2_transcoder": ("gemma-scope", False),
    "gemma_3": ("gemma-scope-2", False),
    "llama_scope": ("llama-scope", False),
    "llama_scope_r1_distill": ("llama-scope-r1", False),
    "goodfire": ("goodfire", True),
    "dictionary_learning_1": ("dictionary-learning", True),
    "qwen_scope": ("qwen-scope", True),
    "mwhanna_transcoder": ("mwhanna-transcoder", False),
}
_GOODFIRE = {
    "Goodfire/Llama-3.1-8B-Instruct-SAE-l19": (19, 4096),
    "Goodfire/Llama-3.3-70B-Instruct-SAE-l50": (50, 8192),
}
# SAELens 6.54.12 QWEN_SCOPE_MODEL_INFO: model key in the repo id -> d_model
_QWEN_SCOPE_D_IN = {
    "Qwen3-1.7B-Base": 2048,
    "Qwen3-8B-Base": 4096,
    "Qwen3-30B-A3B-Base": 2048,
    "Qwen3.5-2B-Base": 2048,
    "Qwen3.5-9B-Base": 4096,
    "Qwen3.5-27B": 5120,
    "Qwen3.5-35B-A3B-Base": 2048,
}
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(hook_\w+|attn\.hook_\w+|mlp\.hook_\w+)")


def _resid(layer: int | None) -> dict[str, Any]:
    if layer is None:
        return {}
    return {
        "hook": f"blocks.{layer}.hook_resid_post",
        "hf_module": f"model.layers.{layer}",
        "hf_side": "output",
        "layer": layer,
    }


def _from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "hook": meta.get("hook_name"),
        "layer": meta.get("hook_layer"),
        "hf_module": meta.get("hf_hook_name"),
        "hf_side": meta.get("hf_hook_side"),
    }


def derive(fmt: str, repo_id: str, path: str, sae_id: str) -> dict[str, Any] | None:
    """fast-steer's fields for one SAE or transcoder (None: skip it, e.g. a Gemma Scope 2 CLT)."""
    if fmt == "gemma-scope":
        info = gemma_scope.describe_gs1(repo_id, path)
        return {
            **_from_metadata(info),
            "d_in": info["d_in"],
            "d_sae": info["d_sae"],
            "architecture": info["architecture"],
            "apply_b_dec_to_input": False,
        }
    if fmt == "gemma-scope-2":
        if gemma_scope.gs2_site(path) is None:
            return None
        info = gemma_scope.describe_gs2(repo_id, path)
        # d_in is the width of w_enc, read from the file (not known before a download)
        return {
            **_from_metadata(info),
            "d_in": None,
            "d_sae": info["d_sae"],
            "architecture": info["architecture"],
            "apply_b_dec_to_input": False,
        }
    if fmt in ("llama-scope", "llama-scope-r1"):
        if fmt == "llama-scope":
            match = re.fullmatch(r"l(\d+)([ram])_(8|32)x", sae_id)
            layer, site, factor = (
                int(match.group(1)),
                {"r": "resid_post", "a": "attn_out", "m": "mlp_out"}[match.group(2)],
                int(match.group(3)),
            )
        else:
            layer, site, factor = int(re.search(r"L(\d+)R", path).group(1)), "resid_post", 8
        meta = llama_scope.hook_metadata(f"blocks.{layer}.hook_{site}", sae_id)
        return {
            **_from_metadata(meta),
            "d_in": 4096,
            "d_sae": 4096 * factor,
            "architecture": "jumprelu",
            "apply_b_dec_to_input": False,
        }
    if fmt == "mwhanna-transcoder":
        layer = int(re.fullmatch(r"layer_(\d+)\.safetensors", path).group(1))
        # widths are in the repo's wandb-config.yaml, the skip connection (if any) in the file
        return {
            "hook": f"blocks.{layer}.mlp.hook_in",
            "hf_module": f"model.layers.{layer}.mlp",
            "hf_side": "input",
            "layer": layer,
            "d_in": None,
            "d_sae": None,
            "architecture": None,
            "apply_b_dec_to_input": False,
        }
    if fmt == "goodfire":
        layer, d_in = _GOODFIRE[repo_id]
        return {
            **_resid(layer),
            "d_in": d_in,
            "d_sae": 65536,
            "architecture": "standard",
            "apply_b_dec_to_input": False,
        }
    if fmt == "dictionary-learning":
        match = re.search(r"layer_(\d+)", path)
        # widths and dict_class (architecture) live in the config.json beside ae.pt
        return {
            **_resid(int(match.group(1)) if match else None),
            "d_in": None,
            "d_sae": None,
            "architecture": None,
            "apply_b_dec_to_input": True,
        }
    if fmt == "qwen-scope":
        match = re.fullmatch(r"Qwen/SAE-Res-(.+)-W(\d+)K-L0_(\d+)", repo_id)
        layer = int(re.fullmatch(r"layer(\d+)", sae_id).group(1))
        return {
            **_resid(layer),
            "d_in": _QWEN_SCOPE_D_IN.get(match.group(1)),
            "d_sae": int(match.group(2)) * 1024,
            "architecture": "topk",
            "k": int(match.group(3)),
            "apply_b_dec_to_input": False,
        }
    # a SAELens folder: only its cfg.json knows the rest; SAELens ids are often the hook name itself
    match = _BLOCK_HOOK.fullmatch(sae_id)
    out: dict[str, Any] = {"d_in": None, "d_sae": None, "architecture": None, "apply_b_dec_to_input": None}
    if match:
        out.update(hook=sae_id, layer=int(match.group(1)))
    return out


def _templated(value: Any, key: str, record: dict[str, Any]) -> Any:
    """`blocks.13.hook_resid_post` -> `blocks.{layer}.hook_resid_post`; `resid_post/<id>` -> `resid_post/{id}`."""
    if not isinstance(value, str):
        return value
    if key == "path" and record["id"] in value:
        return value.replace(record["id"], "{id}")
    if key in ("hook", "hf_module") and isinstance(record.get("layer"), int):
        return re.sub(
            rf"(?<=blocks\.){record['layer']}(?=\.)|(?<=layers\.){record['layer']}(?=\.|$)", "{layer}", value
        )
    return value


def build(sae_lens_dir: Path) -> dict[str, Any]:
    data = yaml.safe_load((sae_lens_dir / "pretrained_saes.yaml").read_text(encoding="utf-8"))
    releases: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for name, release in data.items():
        conversion = release.get("conversion_func") if isinstance(release, dict) else "?"
        if conversion not in FORMATS:
            skipped[str(conversion)] = (
                skipped.get(str(conversion), 0) + len(release.get("saes", []))
                if isinstance(release, dict)
                else 1
            )
            continue
        fmt, needs_pickle = FORMATS[conversion]
        records = []
        for sae in release["saes"]:
            if not isinstance(sae, dict) or "id" not in sae:
                continue  # one malformed upstream entry nests a release here
            sae_id, path = str(sae["id"]), str(sae.get("path", sae["id"]))
            fields = derive(fmt, release["repo_id"], path, sae_id)
            if fields is None:
                skipped[f"{conversion} (not an SAE site)"] = (
                    skipped.get(f"{conversion} (not an SAE site)", 0) + 1
                )
                continue
            record = {
                "id": sae_id,
                "path": path,
                **fields,
                "norm_scaling_factor": sae.get("norm_scaling_factor"),
                "neuronpedia": sae.get("neuronpedia"),
            }
            records.append(record)
        if not records:
            continue
        shared: dict[str, Any] = {}
        for key in SAE_FIELDS:
            values = {json.dumps(_templated(r.get(key), key, r)) for r in records}
            if len(values) == 1:
                shared[key] = json.loads(values.pop())
        saes = [
            {k: v for k, v in r.items() if k == "id" or (k not in shared and v is not None)} for r in records
        ]
        releases[name] = {
            "repo_id": release["repo_id"],
            "model": release.get("model"),
            "converter": conversion or "sae_lens",
            "format": fmt,
            "needs_pickle": needs_pickle,
            **{k: v for k, v in shared.items() if v is not None},
            "saes": saes,
        }
    version = _version_from(sae_lens_dir)
    licence = next(sae_lens_dir.parent.glob("sae_lens-*.dist-info/licenses/LICENSE")).read_text(
        encoding="utf-8"
    )
    return {
        "source": {
            "package": "sae-lens",
            "version": version,
            "file": "sae_lens/pretrained_saes.yaml",
            "license": "MIT",
            "notice": licence,
            "generated_by": "python -m hub.registry.build",
            "skipped": dict(sorted(skipped.items())),
        },
        "releases": releases,
    }


def _version_from(sae_lens_dir: Path) -> str:
    dist = next(sae_lens_dir.parent.glob("sae_lens-*.dist-info"))
    return dist.name.removeprefix("sae_lens-").removesuffix(".dist-info")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m hub.registry.build SAE_LENS_PACKAGE_DIR")
    registry = build(Path(argv[0]))
    out = Path(__file__).with_name(REGISTRY_FILE)
    text = json.dumps(registry, separators=(",", ":"), sort_keys=True) + "\n"
    out.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    n = sum(len(r["saes"]) for r in registry["releases"].values())
    print(f"wrote {out}: {len(registry['releases'])} releases, {n} SAEs, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
