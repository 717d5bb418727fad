"""Gemma Scope (Gemma 2, `params.npz`) and Gemma Scope 2 (Gemma 3, `params.safetensors` + `config.json`).

Both are JumpReLU SAEs with per-feature thresholds, no `b_dec` on the input and no normalisation, as
SAELens 6.54.12's `gemma_2`, `gemma_2_transcoder` and `gemma_3` converters read them. The transcoders (Gemma
Scope 1's `gemma-scope-2b-pt-transcoders`, Gemma Scope 2's `transcoder/`, `transcoder_all/`) read the MLP input
(`pre_feedforward_layernorm` output) and write the MLP output (`post_feedforward_layernorm` output); Gemma Scope
2's `_affine` ones add `x @ affine_skip_connection`. Neither folder states its hook in a way
SAELens uses directly: Gemma Scope 1 has no config at all (everything comes from the repo id and the
folder names), Gemma Scope 2 has a `config.json` in most folders; both are derived here, in one place,
for the loader and for the registry builder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from hub.formats.base import FileTensor, FolderLayout, Tensors, build_config, transpose
from hub.formats.tensor_files import open_tensor_file
from hub.validate import SAEFormatError, read_json

GS1_WEIGHTS_FILE = "params.npz"
GS2_WEIGHTS_FILE = "params.safetensors"
GS2_CONFIG_FILE = "config.json"
WIDTHS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
# Gemma 2 sizes (as SAELens's gemma_2 converter derives them from the repo id): model name and d_model;
# the attention (hook_z) SAEs read n_heads * head_dim instead.
_GEMMA2 = {
    "2b": ("gemma-2-2b", 2304, 2048),
    "9b": ("gemma-2-9b", 3584, 4096),
    "27b": ("gemma-2-27b", 4608, 4608),
}
_LAYER = re.compile(r"layer_(\d+)")
_WIDTH = re.compile(r"width_(\d+[km])")


def _layer(path: str, where: str) -> int:
    match = _LAYER.search(path)
    if match is None:
        raise SAEFormatError(f"{where}: cannot tell the layer: the folder name has no layer_<L> ({path!r})")
    return int(match.group(1))


def _width(path: str) -> int | None:
    match = _WIDTH.search(path)
    return WIDTHS.get(match.group(1)) if match else None


def _site_metadata(site: str, layer: int) -> dict[str, Any]:
    """SAELens hook name and the transformers module each Gemma Scope site reads."""
    hooks = {
        "resid_post": (f"blocks.{layer}.hook_resid_post", f"model.layers.{layer}", "output"),
        "mlp_out": (
            f"blocks.{layer}.hook_mlp_out",
            f"model.layers.{layer}.post_feedforward_layernorm",
            "output",
        ),
        "attn_out": (f"blocks.{layer}.attn.hook_z", f"model.layers.{layer}.self_attn.o_proj", "input"),
        "transcoder": (
            f"blocks.{layer}.hook_mlp_in",
            f"model.layers.{layer}.pre_feedforward_layernorm",
            "output",
        ),
    }
    hook, module, side = hooks[site]
    meta = {"hook_name": hook, "hook_layer": layer, "hf_hook_name": module, "hf_hook_side": side}
    if site == "transcoder":  # where it writes (SAELens's names)
        meta["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
        meta["hf_hook_name_out"] = f"model.layers.{layer}.post_feedforward_layernorm"
    return meta


# -- Gemma Scope 1 ----------------------------------------------------------------------------
def describe_gs1(repo_id: str, path: str) -> dict[str, Any]:
    """What SAELens's `gemma_2` / `gemma_2_transcoder` converters derive from a repo id and folder: model, hook,
    d_in, d_sae, architecture."""
    where = f"{repo_id}:{path}"
    size = next((key for key in ("27b", "9b", "2b") if key in repo_id), None)
    if size is None:
        raise SAEFormatError(f"{where}: cannot tell the Gemma 2 size (2b, 9b or 27b) from the repo id")
    name, d_model, d_attn = _GEMMA2[size]
    if "-it" in repo_id:
        name += "-it"
    if "embedding" in path:
        meta: dict[str, Any] = {
            "hook_name": "hook_embed",
            "hook_layer": 0,
            "hf_hook_name": "model.embed_tokens",
        }
        d_in = d_model
    else:
        site = next(
            (
                s
                for key, s in (
                    ("transcoders", "transcoder"),
                    ("res", "resid_post"),
                    ("mlp", "mlp_out"),
                    ("att", "attn_out"),
                )
                if f"-{key}" in repo_id
            ),
            None,
        )
        if site is None:
            raise SAEFormatError(
                f"{where}: cannot tell the site (res, mlp, att or transcoders) from the repo id"
            )
        layer = _layer(path, where)
        meta = _site_metadata(site, layer)
        if site == "transcoder":  # SAELens's gemma_2_transcoder names the MLP input by TransformerLens's ln2
            meta["hook_name"] = f"blocks.{layer}.ln2.hook_normalized"
        d_in = d_attn if site == "attn_out" else d_model
    architecture = "jumprelu_transcoder" if "hook_name_out" in meta else "jumprelu"
    return {"model_name": name, "d_in": d_in, "d_sae": _width(path), "architecture": architecture, **meta}


def _gs1_key(names: list[str], upper: str) -> str:
    """Gemma Scope's own names are `W_enc`/`W_dec`; SAELens also reads `w_enc`/`w_dec`."""
    lower = "w_" + upper[2:]
    return lower if lower in names and upper not in names else upper


def parse_gs1(folder: Path, hints: dict[str, Any]) -> FolderLayout:
    """`params.npz`: `W_enc [D,F]`, `W_dec [F,D]`, `b_enc [F]`, `b_dec [D]`, `threshold [F]` (+ `scaling_factor`).

    `hints` may carry `repo_id` and `path` (from the registry); without them, the folder's own path is used
    (a Hugging Face cache path contains the repo id).
    """
    weights = folder / GS1_WEIGHTS_FILE
    where = str(weights)
    with open_tensor_file(weights) as f:
        names = f.keys()
        W_enc = _gs1_key(names, "W_enc")
        if W_enc not in names:
            raise SAEFormatError(f"{where}: missing array W_enc (or w_enc); found {', '.join(sorted(names))}")
        d_in, d_sae = f.shape(W_enc)
    repo_id = hints.get("repo_id") or str(folder).replace("models--", "").replace("--", "/")
    path = hints.get("path") or str(folder)
    info = describe_gs1(repo_id, path)
    if info["d_sae"] is not None and info["d_sae"] != d_sae:
        raise SAEFormatError(
            f"{where}: {W_enc} has shape [{d_in}, {d_sae}], but the folder name {path!r} says width "
            f"{info['d_sae']} (expected d_sae={info['d_sae']})"
        )
    metadata = {k: v for k, v in info.items() if k not in ("d_in", "d_sae", "architecture")}
    embedding = metadata.get("hook_name") == "hook_embed"
    if embedding:
        metadata["embedding_scale_folded"] = math.sqrt(d_in)
    transcoder = info["architecture"] != "jumprelu"  # a Gemma Scope 1 transcoder writes the width it reads
    cfg = build_config(
        where,
        architecture=info["architecture"],
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_in if transcoder else None,
        apply_b_dec_to_input=False,
        metadata=metadata,
    )
    tensors = [
        FileTensor(W_enc, (d_in, d_sae), "W_enc"),
        FileTensor("b_enc", (d_sae,), "b_enc"),
        FileTensor(_gs1_key(names, "W_dec"), (d_sae, d_in), "W_dec"),
        FileTensor("b_dec", (d_in,), "b_dec"),
        FileTensor("threshold", (d_sae,), "threshold"),
    ]
    if "scaling_factor" in names:
        tensors.append(FileTensor("scaling_factor", (d_sae,), "scaling_factor"))

    def fold(loaded: Tensors) -> None:
        scale = loaded.pop("scaling_factor", None)
        if scale is not None:  # SAELens: all ones is dropped, anything else scales f before decoding
            loaded["W_dec"] = loaded["W_dec"] * scale[:, None]
        if embedding:  # trained on unscaled embeddings; Gemma multiplies them by sqrt(d_model)
            loaded["W_enc"] = loaded["W_enc"] / math.sqrt(d_in)
            loaded["W_dec"] = loaded["W_dec"] * math.sqrt(d_in)

    return FolderLayout("gemma-scope", cfg, GS1_WEIGHTS_FILE, tensors, None, fold)


# -- Gemma Scope 2 ----------------------------------------------------------------------------
GS2_SITES = ("resid_post", "attn_out", "mlp_out", "transcoder")
_GS2_HF_HOOKS = {
    "resid_post": "model.layers.{L}.output",
    "attn_out": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
    "transcoder": "model.layers.{L}.pre_feedforward_layernorm.output",
}
GS2_ARCHITECTURES = {  # (site is a transcoder, affine) -> our architecture (SAELens's names)
    (False, False): "jumprelu",
    (True, False): "jumprelu_transcoder",
    (True, True): "jumprelu_skip_transcoder",
}


def gs2_site(path: str) -> str | None:
    """The Gemma Scope 2 kind a folder path names (`resid_post`... `transcoder`), None for CLTs, crosscoders."""
    if any(kind in path for kind in ("clt", "crosscoder")):
        return None
    return next((site for site in GS2_SITES if site in path), None)


def describe_gs2(repo_id: str, path: str) -> dict[str, Any]:
    """Hook, layer, width and architecture of a Gemma Scope 2 SAE or transcoder from its repo id and folder
    (as SAELens infers them: a transcoder is affine when its folder name says `affine`)."""
    where = f"{repo_id}:{path}"
    site = gs2_site(path)
    if site is None:
        raise SAEFormatError(
            f"{where}: not a Gemma Scope 2 SAE folder; expected resid_post/, attn_out/, mlp_out/ or transcoder/ "
            "(CLTs and crosscoders are not supported)"
        )
    transcoder = site == "transcoder"
    return {
        "model_name": repo_id.replace("gemma-scope-2", "gemma-3"),
        "d_sae": _width(path),
        "architecture": GS2_ARCHITECTURES[transcoder, transcoder and "affine" in path],
        **_site_metadata(site, _layer(path, where)),
    }


def parse_gs2(folder: Path, hints: dict[str, Any]) -> FolderLayout:
    """`params.safetensors` (`w_enc [D,F]`, `w_dec [F,D_out]`, `b_enc`, `b_dec`, `threshold`; affine transcoders
    `affine_skip_connection [D,D_out]`) + optional `config.json`."""
    weights = folder / GS2_WEIGHTS_FILE
    where = str(weights)
    path = hints.get("path") or str(folder)
    config_path = folder / GS2_CONFIG_FILE
    raw = read_json(config_path) if config_path.is_file() else {}
    if raw:
        if raw.get("architecture") != "jump_relu":
            raise SAEFormatError(
                f"{config_path}: architecture {raw.get('architecture')!r} is not supported; expected 'jump_relu'"
            )
        kind = raw.get("type", "sae")
        if kind not in ("sae", "transcoder"):
            raise SAEFormatError(
                f"{config_path}: type {kind!r} is not supported; expected 'sae' or 'transcoder' "
                "(CLTs and crosscoders are not loaded)"
            )
        hook_in = str(raw.get("hf_hook_point_in", ""))
        site = next(
            (
                s
                for s, tpl in _GS2_HF_HOOKS.items()
                if re.fullmatch(tpl.replace(".", r"\.").replace("{L}", r"\d+"), hook_in)
            ),
            None,
        )
        if site is None:
            raise SAEFormatError(
                f"{config_path}: hf_hook_point_in {hook_in!r} is not a Gemma Scope 2 SAE site; expected one of "
                + ", ".join(tpl for tpl in _GS2_HF_HOOKS.values())
            )
        if (site == "transcoder") != (kind == "transcoder"):
            raise SAEFormatError(
                f"{config_path}: type {kind!r} does not match hf_hook_point_in {hook_in!r} (a transcoder reads "
                f"{_GS2_HF_HOOKS['transcoder']}, an SAE one of the other sites)"
            )
        layer = int(re.search(r"layers\.(\d+)", hook_in).group(1))
        transcoder = kind == "transcoder"
        info: dict[str, Any] = {
            "model_name": raw.get("model_name"),
            "architecture": GS2_ARCHITECTURES[transcoder, transcoder and bool(raw.get("affine_connection"))],
            **_site_metadata(site, layer),
        }
        width = raw.get("width")
    else:
        repo_id = hints.get("repo_id") or str(folder).replace("models--", "").replace("--", "/")
        info = describe_gs2(repo_id, path)
        width = None
    with open_tensor_file(weights) as f:
        names = f.keys()
        for key in ("w_enc", "w_dec"):
            if key not in names:
                raise SAEFormatError(f"{where}: missing tensor {key}; found {', '.join(sorted(names))}")
        d_in, d_sae = f.shape("w_enc")
        d_out = f.shape("w_dec")[-1]
    if width is not None and width != d_sae:
        raise SAEFormatError(
            f"{config_path}: width={width} but {GS2_WEIGHTS_FILE} has w_enc of shape [{d_in}, {d_sae}] "
            f"(expected width to equal d_sae={d_sae})"
        )
    architecture = info.pop("architecture")
    transcoder = architecture != "jumprelu"
    metadata = {k: v for k, v in info.items() if k not in ("d_sae", "d_in") and v is not None}
    cfg = build_config(
        where,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        apply_b_dec_to_input=False,
        metadata=metadata,
    )
    d_out = d_out if transcoder else d_in
    tensors = [
        FileTensor("w_enc", (d_in, d_sae), "W_enc"),
        FileTensor("b_enc", (d_sae,), "b_enc"),
        FileTensor("w_dec", (d_sae, d_out), "W_dec"),
        FileTensor("b_dec", (d_out,), "b_dec"),
        FileTensor("threshold", (d_sae,), "threshold"),
    ]
    if architecture == "jumprelu_skip_transcoder":  # stored [d_in, d_out] for `x @ A`; W_skip is A^T
        tensors.append(FileTensor("affine_skip_connection", (d_in, d_out), "W_skip", transpose))
    return FolderLayout("gemma-scope-2", cfg, GS2_WEIGHTS_FILE, tensors, None)
