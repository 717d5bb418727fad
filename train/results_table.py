"""The reproduce experiment's results table: rows from eval JSONs, written as JSON, Markdown and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# (key in a row's metrics, column title in the Markdown table, number format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mse", "MSE", ".4g"),
    ("log2_mse", "log2 MSE", ".4f"),
    ("mse_st", "MSE_st", ".4g"),
    ("log2_mse_st", "log2 MSE_st", ".4f"),
    ("l0", "L0", ".1f"),
    ("explained_variance", "expl. var.", ".4f"),
    ("dead_share", "dead share", ".3f"),
    ("delta_lm_loss", "Δ LM loss", ".4f"),
    ("delta_lm_loss_pct", "Δ LM loss %", ".2f"),
)
METHOD_ORDER = ("fast", "bt-f", "bt-p")
METHOD_LABELS = {"fast": "FAST", "bt-f": "BT(F)", "bt-p": "BT(P)"}
# The paper's tables (Qwen2.5-7B-Instruct, layer 18): log2 MSE_st per architecture and method, for reference.
PAPER_LOG2_MSE_ST = {
    "standard": {"fast": 0.6468, "bt-f": 1.5093, "bt-p": 5.1985},
    "jumprelu": {"fast": -9.7604, "bt-f": -8.0743, "bt-p": -4.0005},
}


@dataclass
class ResultRow:
    """One trained SAE's held-out metrics (keys of `COLUMNS`) and how it was trained."""

    method: str
    arch: str
    metrics: dict[str, float]
    sae_dir: str
    tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{METHOD_LABELS.get(self.method, self.method)} {self.arch}"


def check_metrics(metrics: dict[str, Any], where: str) -> dict[str, float]:
    """The `COLUMNS` metrics of `metrics` as floats; a clear error naming what is missing."""
    missing = [key for key, _, _ in COLUMNS if key not in metrics]
    if missing:
        raise KeyError(
            f"{where} lacks metric(s) {', '.join(missing)}; expected all of {[k for k, _, _ in COLUMNS]}"
        )
    return {key: float(metrics[key]) for key, _, _ in COLUMNS}


def sort_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """Rows grouped by architecture, methods in the paper's order (FAST, BT(F), BT(P))."""

    def key(row: ResultRow) -> tuple[str, int]:
        rank = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
        return (row.arch, rank)

    return sorted(rows, key=key)


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(rows: list[ResultRow]) -> str:
    """A Markdown table, one row per SAE, with the paper's log2 MSE_st beside ours for reference."""
    head = ["SAE", *[title for _, title, _ in COLUMNS], "paper log2 MSE_st (Qwen2.5-7B)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sort_rows(rows):
        cells = [row.label, *[_fmt(row.metrics.get(key), spec) for key, _, spec in COLUMNS]]
        cells.append(_fmt(PAPER_LOG2_MSE_ST.get(row.arch, {}).get(row.method), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_table(rows: list[ResultRow]) -> str:
    """MSE and MSE_st of each baseline divided by FAST's (same architecture): > 1 means FAST is better."""
    by_key = {(r.arch, r.method): r for r in rows}
    lines = ["| architecture | baseline | MSE / MSE(FAST) | MSE_st / MSE_st(FAST) |", "|---|---|---|---|"]
    for arch in sorted({r.arch for r in rows}):
        fast = by_key.get((arch, "fast"))
        if fast is None:
            continue
        for method in METHOD_ORDER[1:]:
            base = by_key.get((arch, method))
            if base is None:
                continue
            ratios = [
                base.metrics[k] / fast.metrics[k] if fast.metrics[k] else float("nan")
                for k in ("mse", "mse_st")
            ]
            lines.append(f"| {arch} | {METHOD_LABELS[method]} | {ratios[0]:.3f} | {ratios[1]:.3f} |")
    return "\n".join(lines) + "\n"


def token_type_table(rows: list[ResultRow]) -> str:
    """Held-out MSE per element by token type (position 0, each special/role token, other tokens), per SAE."""
    types: list[str] = []
    for row in rows:
        types += [t for t in row.extra.get("mse_by_token_type", {}) if t not in types]
    if not types:
        return ""
    lines = [
        "| SAE | " + " | ".join(f"`{t}`".replace("|", "\\|") for t in types) + " |",
        "|---|" + "---|" * len(types),
    ]
    for row in sort_rows(rows):
        by_type = row.extra.get("mse_by_token_type", {})
        lines.append(f"| {row.label} | " + " | ".join(_fmt(by_type.get(t), ".4g") for t in types) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[ResultRow], out_dir: Path, header: dict[str, Any]) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `results.png` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "plot": out_dir / "results.png",
    }
    payload = {
        **header,
        "rows": [asdict(r) for r in rows],
        "paper_log2_mse_st_qwen2.5_7b_l18": PAPER_LOG2_MSE_ST,
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    settings = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    md = (
        "# FAST vs block training: held-out reconstruction\n\n"
        f"{settings}\n\n{markdown_table(rows)}\n"
        "Baseline / FAST ratios (same architecture; > 1 means FAST reconstructs better):\n\n"
        f"{ratio_table(rows)}"
    )
    by_type = token_type_table(rows)
    if by_type:
        md += f"\nMSE per element by token type (position 0 is its own column: the attention sink):\n\n{by_type}"
    paths["markdown"].write_text(md, encoding="utf-8")
    plot_results(rows, paths["plot"], title=f"{header.get('model', '')} layer {header.get('layer', '')}")
    return paths


def plot_results(rows: list[ResultRow], path: Path, title: str = "") -> None:
    """Grouped bars (methods x architectures) of log2 MSE, log2 MSE_st, L0 and Δ LM loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("log2_mse", "log2 MSE"),
        ("log2_mse_st", "log2 MSE_st (special tokens)"),
        ("l0", "L0"),
        ("delta_lm_loss", "Δ LM loss (nats)"),
    )
    archs = sorted({r.arch for r in rows})
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in rows)]
    by_key = {(r.arch, r.method): r for r in rows}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / max(len(archs), 1)
    for ax, (key, name) in zip(axes, panels, strict=True):
        for i, arch in enumerate(archs):
            xs = [j + (i - (len(archs) - 1) / 2) * width for j in range(len(methods))]
            ys = [by_key[(arch, m)].metrics[key] if (arch, m) in by_key else float("nan") for m in methods]
            bars = ax.bar(xs, ys, width=width, label=arch)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods])
        ax.set_title(name, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
