"""The model card (README.md) of a Hub repo of SAEs: YAML front matter, tables, results, load snippets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from hub.labels import LABELS_FILE, LabelFile
from hub.sae_io import sae_layer
from steer.errors import ConfigError

# Metadata shown as columns of the overview table (the rest goes to each SAE's own table).
_OVERVIEW = (
    "architecture",
    "layer",
    "hook",
    "d_in",
    "d_sae",
    "expansion",
    "k",
    "method",
    "training_tokens",
    "dtype",
)
CARD_LABELS_SHOWN = 20  # labelled features listed per SAE in the card (the best-scored ones)


@dataclass
class CardEntry:
    """One SAE of the repo: its sub-folder, its SAELens v6 `cfg.json`, results files and labels found beside it."""

    sae_id: str
    cfg: dict[str, Any]
    evals: dict[str, Any] = field(default_factory=dict)
    labels: LabelFile | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.get("metadata") or {}

    def overview(self) -> dict[str, Any]:
        meta, cfg = self.metadata, self.cfg
        d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
        expansion = d_sae / d_in if d_in and d_sae else None
        return {
            "architecture": cfg.get("architecture"),
            "layer": sae_layer(meta),
            "hook": meta.get("hook_name"),
            "d_in": d_in,
            "d_sae": d_sae,
            "expansion": f"{expansion:g}x" if expansion else None,
            "k": cfg.get("k"),
            "method": meta.get("method"),
            "training_tokens": meta.get("training_tokens"),
            "dtype": cfg.get("dtype"),
        }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value)
    if len(text) > 200:
        text = text[:197] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested results -> `{"a.b.c": value}` rows."""
    if isinstance(data, dict):
        rows: dict[str, Any] = {}
        for key, value in data.items():
            rows.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
        return rows
    return {prefix.rstrip(".") or "value": data}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def front_matter(entries: list[CardEntry]) -> dict[str, Any]:
    models = sorted({str(e.metadata["model_name"]) for e in entries if e.metadata.get("model_name")})
    tags = ["sparse-autoencoder", "sae", "saelens", "fast-steer", "interpretability"]
    tags += sorted({str(e.cfg.get("architecture")) for e in entries if e.cfg.get("architecture")})
    tags += sorted({str(e.metadata["method"]) for e in entries if e.metadata.get("method")})
    matter: dict[str, Any] = {"library_name": "saelens", "tags": tags}
    hub_models = [m for m in models if "/" in m]
    if hub_models:
        matter["base_model"] = hub_models if len(hub_models) > 1 else hub_models[0]
    return matter


def render_card(repo_id: str, entries: list[CardEntry]) -> str:
    """README.md for `repo_id` holding `entries` (one sub-folder each)."""
    if not entries:
        raise ConfigError("a model card needs at least one SAE")
    entries = sorted(entries, key=lambda e: e.sae_id)
    models = sorted({str(e.metadata.get("model_name")) for e in entries if e.metadata.get("model_name")})
    lines = ["---", yaml.safe_dump(front_matter(entries), sort_keys=False).rstrip(), "---", ""]
    lines += [f"# Sparse autoencoders for {', '.join(models) or 'a language model'}", ""]
    lines += [
        f"This repository holds {len(entries)} sparse autoencoder(s) (SAEs) on the residual stream, one per "
        "sub-folder, in the SAELens v6 layout (`cfg.json` + `sae_weights.safetensors`), written by fast-steer. "
        "Method FAST is the paper's sequential training on chat data for instruct models "
        "([arXiv 2506.07691](https://arxiv.org/abs/2506.07691)); BT(F)/BT(P) are its block-training baselines. "
        "Layer L is the output of decoder block L (`blocks.L.hook_resid_post`).",
        "",
        "## SAEs",
        "",
    ]
    lines += _table(["sae_id", *_OVERVIEW], [[e.sae_id, *e.overview().values()] for e in entries])
    first = entries[0].sae_id
    lines += [
        "",
        "## Loading",
        "",
        "With fast-steer:",
        "",
        "```python",
        "from hub import load_sae",
        "",
        f'sae = load_sae("{repo_id}", "{first}")',
        "features = sae.encode(residuals)  # [..., d_in] -> [..., d_sae]",
        "```",
        "",
        "```bash",
        f'fast-steer pull {repo_id} --sae-id "{first}"',
        "```",
        "",
        "With SAELens (>= 6):",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{first}")',
        "# or from a local copy of the sub-folder:",
        "from huggingface_hub import snapshot_download",
        "",
        f'root = snapshot_download("{repo_id}", allow_patterns=["{first}/*"])',
        f'sae = SAE.load_from_disk(f"{{root}}/{first}")',
        "```",
        "",
        "## Details",
    ]
    for entry in entries:
        lines += ["", f"### `{entry.sae_id}`", ""]
        config_rows = [[k, v] for k, v in entry.cfg.items() if k != "metadata"]
        meta_rows = [[f"metadata.{k}", v] for k, v in entry.metadata.items()]
        lines += _table(["key", "value"], config_rows + meta_rows)
        for name, results in sorted(entry.evals.items()):
            lines += ["", f"Evaluation results (`{name}`):", ""]
            lines += _table(["metric", "value"], [[k, v] for k, v in _flatten(results).items()])
        if entry.labels is not None and entry.labels.default is not None:
            lines += _labels_section(repo_id, entry.sae_id, entry.labels)
    return "\n".join(lines) + "\n"


def _labels_section(repo_id: str, sae_id: str, labels: LabelFile) -> list[str]:
    """The SAE's labellings (the default first) and its best-scored labelled features."""
    default = labels.default
    verdict = {True: "passed", False: "failed", None: "not checked"}
    ordered = sorted(labels.labellings, key=lambda lab: lab is not default)
    lines = ["", f"Feature labels (`{LABELS_FILE}`; the first labelling is the default):", ""]
    lines += _table(
        ["judge model", "scorer", "date", "features", "quality (0-1)", "judge controls"],
        [
            [
                lab.judge_model,
                lab.scorer,
                lab.date,
                len(lab.features),
                lab.quality(),
                verdict[lab.judge_validated],
            ]
            for lab in ordered
        ],
    )
    shown = sorted(default.features.values(), key=lambda f: (f.score is None, -(f.score or 0.0), f.feature))
    lines += [
        "",
        f"Best-scored features (score on {default.score_range[0]:g}..{default.score_range[1]:g}):",
        "",
    ]
    lines += _table(
        ["feature", "label", "score", "density"],
        [[f.feature, f.label, f.score, f.density] for f in shown[:CARD_LABELS_SHOWN]],
    )
    lines += [
        "",
        f'Search them: `fast-steer features {repo_id} --sae-id "{sae_id}" --search "TEXT"`; in Python, '
        f'`load_sae("{repo_id}", "{sae_id}").labels.search("TEXT")`.',
    ]
    return lines
