"""The reproduce experiment's results: rows from eval JSONs, written as JSON, Markdown and plots.

Two views of the same SAEs:
- the paper's: each architecture at its fixed coefficient, per training variant (`markdown_table`,
  `ratio_table`, `token_type_table`, `gsnr_table`);
- the L0-matched one (SAEBench's reading: equal hyper-parameters are not equal sparsity): every
  coefficient of the frontier variant on the MSE-L0, MSE_st-L0 and Δ LM loss-L0 planes
  (`frontier_table`, `plot_frontiers`), and each method interpolated at common L0 values
  (`matched_table`: linear in log L0, of log MSE and of Δ LM loss %, inside the L0 range every method
  covers; no extrapolation).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from train.plots import pyplot
from train.sequences import METHOD_LABELS, METHODS

# (key in a row's metrics, column title in the Markdown table, number format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mse", "MSE", ".4g"),
    ("log2_mse", "log2 MSE", ".4f"),
    ("mse_st", "MSE_st", ".4g"),
    ("log2_mse_st", "log2 MSE_st", ".4f"),
    ("log2_mse_st_after_first", "log2 MSE_st, pos > 0", ".4f"),
    ("l0", "L0", ".1f"),
    ("explained_variance", "expl. var.", ".4f"),
    ("dead_share", "dead share", ".3f"),
    ("delta_lm_loss", "Δ LM loss", ".4f"),
    ("delta_lm_loss_pct", "Δ LM loss %", ".2f"),
)
# The paper's tables (Qwen2.5-7B-Instruct, layer 18): log2 MSE_st per architecture and method, for reference.
PAPER_LOG2_MSE_ST = {
    "standard": {"fast": 0.6468, "bt-f": 1.5093, "bt-p": 5.1985},
    "jumprelu": {"fast": -9.7604, "bt-f": -8.0743, "bt-p": -4.0005},
}
# (metric, axis title, log scale) of the frontier plots and the matched table
FRONTIER_METRICS = (
    ("mse", "MSE", True),
    ("mse_st", "MSE_st (Table 11)", True),
    ("delta_lm_loss_pct", "Δ LM loss %", False),
)


@dataclass
class ResultRow:
    """One trained SAE's held-out metrics (keys of `COLUMNS`) and how it was trained."""

    method: str
    arch: str
    metrics: dict[str, float]
    sae_dir: str
    tokens: int | None = None
    variant: str = "all"  # training variant (`train.experiment.VARIANTS`)
    coefficient: float | None = None  # sparsity coefficient (None: topk)
    init_threshold: float | None = None  # jumprelu's initial threshold
    paper_view: bool = True  # trained at the fixed (paper-view) coefficient
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


def mean_gsnr(records: list[dict[str, Any]], name: str | None) -> dict[str, float] | None:
    """Mean logged GSNR of `W_enc` / `W_dec` of SAE `name` (None: a run's only SAE) over a training log."""
    values: dict[str, list[float]] = {"W_enc": [], "W_dec": []}
    for record in records:
        saes = record.get("saes", {})
        sae = saes.get(name) if name is not None else next(iter(saes.values()), None)
        for param in values:
            if sae and f"gsnr_{param}" in sae:
                values[param].append(float(sae[f"gsnr_{param}"]))
    if not values["W_enc"]:
        return None
    return {**{p: sum(v) / len(v) for p, v in values.items()}, "measurements": len(values["W_enc"])}


def _method_rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def sort_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """Rows grouped by variant and architecture, methods in the paper's order, then by coefficient."""
    return sorted(rows, key=lambda r: (r.variant, r.arch, _method_rank(r.method), r.coefficient or 0.0))


def paper_rows(rows: list[ResultRow], variant: str | None = None) -> list[ResultRow]:
    return [r for r in sort_rows(rows) if r.paper_view and variant in (None, r.variant)]


def variants_of(rows: list[ResultRow]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in rows))


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(rows: list[ResultRow]) -> str:
    """The paper view: one row per SAE at the fixed coefficient, with the paper's log2 MSE_st beside ours."""
    head = ["variant", "SAE", "coef.", *[title for _, title, _ in COLUMNS], "paper log2 MSE_st (Qwen2.5-7B)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in paper_rows(rows):
        cells = [row.variant, row.label, _fmt(row.coefficient, "g")]
        cells += [_fmt(row.metrics.get(key), spec) for key, _, spec in COLUMNS]
        cells.append(_fmt(PAPER_LOG2_MSE_ST.get(row.arch, {}).get(row.method), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_table(rows: list[ResultRow]) -> str:
    """MSE and MSE_st of each baseline divided by FAST's (paper view, same variant and architecture):
    > 1 means FAST is better."""
    by_key = {(r.variant, r.arch, r.method): r for r in paper_rows(rows)}
    lines = [
        "| variant | architecture | baseline | MSE / MSE(FAST) | MSE_st / MSE_st(FAST) | L0 / L0(FAST) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, arch, method in sorted(by_key, key=lambda k: (k[0], k[1], _method_rank(k[2]))):
        fast = by_key.get((variant, arch, "fast"))
        if fast is None or method == "fast":
            continue
        base = by_key[(variant, arch, method)]
        ratios = [
            base.metrics[k] / fast.metrics[k] if fast.metrics[k] else float("nan")
            for k in ("mse", "mse_st", "l0")
        ]
        cells = " | ".join(f"{x:.3f}" for x in ratios)
        lines.append(f"| {variant} | {arch} | {METHOD_LABELS[method]} | {cells} |")
    return "\n".join(lines) + "\n"


def token_type_table(rows: list[ResultRow]) -> str:
    """Held-out MSE per element by token type (position 0, each special/role token, other tokens), per
    paper-view SAE."""
    chosen = paper_rows(rows)
    types: list[str] = []
    for row in chosen:
        types += [t for t in row.extra.get("mse_by_token_type", {}) if t not in types]
    if not types:
        return ""
    lines = [
        "| variant | SAE | " + " | ".join(f"`{t}`".replace("|", "\\|") for t in types) + " |",
        "|---|---|" + "---|" * len(types),
    ]
    for row in chosen:
        by_type = row.extra.get("mse_by_token_type", {})
        cells = " | ".join(_fmt(by_type.get(t), ".4g") for t in types)
        lines.append(f"| {row.variant} | {row.label} | {cells} |")
    return "\n".join(lines) + "\n"


def gsnr_table(rows: list[ResultRow]) -> str:
    """Mean training GSNR of W_enc / W_dec per paper-view SAE ('' when no run logged it)."""
    chosen = [r for r in paper_rows(rows) if r.extra.get("gsnr")]
    if not chosen:
        return ""
    lines = ["| variant | SAE | GSNR W_enc | GSNR W_dec | measurements |", "|---|---|---|---|---|"]
    for r in chosen:
        g = r.extra["gsnr"]
        lines.append(
            f"| {r.variant} | {r.label} | {g['W_enc']:.4g} | {g['W_dec']:.4g} | {g['measurements']} |"
        )
    return "\n".join(lines) + "\n"


def frontier_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """The frontier variant's rows (the variant that trained the most coefficients)."""
    variants = variants_of(rows)
    if not variants:
        return []
    variant = max(variants, key=lambda v: sum(r.variant == v for r in rows))
    return [r for r in sort_rows(rows) if r.variant == variant]


def frontier_table(rows: list[ResultRow]) -> str:
    """Every coefficient of the frontier variant, ordered by architecture, method and L0."""
    chosen = sorted(frontier_rows(rows), key=lambda r: (r.arch, _method_rank(r.method), r.metrics["l0"]))
    lines = [
        "| variant | SAE | coef. | initial threshold | L0 | MSE | MSE_st | log2 MSE_st, pos > 0 | expl. var. | "
        "Δ LM loss % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in chosen:
        m = r.metrics
        lines.append(
            f"| {r.variant} | {r.label} | {_fmt(r.coefficient, 'g')} | {_fmt(r.init_threshold, 'g')} | "
            f"{m['l0']:.1f} | {m['mse']:.4g} | "
            f"{m['mse_st']:.4g} | {m['log2_mse_st_after_first']:.4f} | {m['explained_variance']:.4f} | "
            f"{m['delta_lm_loss_pct']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def interpolate(points: list[tuple[float, float]], l0: float, log_y: bool) -> float | None:
    """y at `l0` on the piecewise-linear curve through (L0, y) `points` in log L0 (log y where `log_y`);
    None outside the points' L0 range."""
    pts = sorted(
        (math.log(x), math.log(y) if log_y else y) for x, y in points if x > 0 and (y > 0 or not log_y)
    )
    t = math.log(l0)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= t <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (t - x0) / (x1 - x0)
            return math.exp(y) if log_y else y
    if pts and math.isclose(pts[0][0], t):
        return math.exp(pts[0][1]) if log_y else pts[0][1]
    return None


def matched_points(rows: list[ResultRow], n: int = 3) -> dict[str, dict[str, Any]]:
    """Per architecture: `n` L0 values spread geometrically over the range that every method's frontier
    covers, with each method's interpolated metrics there ({} for an architecture without overlap)."""
    out: dict[str, dict[str, Any]] = {}
    chosen = frontier_rows(rows)
    for arch in sorted({r.arch for r in chosen}):
        curves: dict[str, list[ResultRow]] = {}
        for r in chosen:
            if r.arch == arch:
                curves.setdefault(r.method, []).append(r)
        if len(curves) < 2 or any(len(c) < 2 for c in curves.values()):
            out[arch] = {"l0": [], "why": "fewer than two methods with two or more coefficients each"}
            continue
        lo = max(min(r.metrics["l0"] for r in c) for c in curves.values())
        hi = min(max(r.metrics["l0"] for r in c) for c in curves.values())
        if not 0 < lo <= hi:
            out[arch] = {"l0": [], "why": "the methods' L0 ranges do not overlap"}
            continue
        targets = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if hi > lo else [lo]
        table = {
            method: {
                key: [
                    interpolate([(r.metrics["l0"], r.metrics[key]) for r in curve], t, log_y) for t in targets
                ]
                for key, _, log_y in FRONTIER_METRICS
            }
            for method, curve in sorted(curves.items(), key=lambda kv: _method_rank(kv[0]))
        }
        out[arch] = {"l0": targets, "methods": table}
    return out


def matched_table(matched: dict[str, dict[str, Any]]) -> str:
    """`matched_points` as Markdown: one row per architecture, L0 and method."""
    lines = [
        "| architecture | L0 | method | MSE | MSE_st | Δ LM loss % |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for arch, entry in matched.items():
        if not entry["l0"]:
            notes.append(f"- {arch}: no L0-matched comparison ({entry['why']}).")
            continue
        for i, l0 in enumerate(entry["l0"]):
            for method, values in entry["methods"].items():
                cells = " | ".join(_fmt(values[key][i], ".4g") for key, _, _ in FRONTIER_METRICS)
                lines.append(f"| {arch} | {l0:.1f} | {METHOD_LABELS.get(method, method)} | {cells} |")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


RESULTS_FILE = "results.json"  # the payload that `fast-steer experiment report` renders


def write_results(rows: list[ResultRow], out_dir: Path, header: dict[str, Any]) -> dict[str, Path]:
    """Write `results.json`, `results.md`, `results.png` (paper view) and `frontier.png` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows)
    paths = {
        "json": out_dir / RESULTS_FILE,
        "markdown": out_dir / "results.md",
        "plot": out_dir / "results.png",
        "frontier": out_dir / "frontier.png",
    }
    matched = matched_points(rows)
    payload = {
        **header,
        "rows": [asdict(r) for r in rows],
        "l0_matched": matched,
        "paper_log2_mse_st_qwen2.5_7b_l18": PAPER_LOG2_MSE_ST,
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(results_markdown(payload, level=1), encoding="utf-8")
    title = f"{header.get('model', '')} layer {header.get('layer', '')}"
    plot_results(rows, paths["plot"], title=title)
    plot_frontiers(rows, paths["frontier"], title=title)
    return paths


def rows_from_payload(payload: dict[str, Any]) -> list[ResultRow]:
    return [ResultRow(**r) for r in payload["rows"]]


def results_markdown(payload: dict[str, Any], level: int = 1) -> str:
    """The tables of a `results.json` payload as Markdown (headings start at `level`)."""
    rows = rows_from_payload(payload)
    h = "#" * level
    skip = {"rows", "l0_matched", "paper_log2_mse_st_qwen2.5_7b_l18", "environment", "command"}
    settings = "\n".join(f"- {k}: `{v}`" for k, v in payload.items() if k not in skip)
    parts = [
        f"{h} FAST vs block training: held-out reconstruction\n\n{settings}\n",
        f"{h}# The paper's view: fixed coefficients\n\n{markdown_table(rows)}",
        "Baseline / FAST ratios (same variant and architecture; > 1 means FAST reconstructs better):\n\n"
        + ratio_table(rows),
    ]
    by_type = token_type_table(rows)
    if by_type:
        parts.append(
            "MSE per element by token type (`first token` is position 0, the attention sink; the "
            f"`<|im_start|>` column is every other `<|im_start|>`):\n\n{by_type}"
        )
    parts.append(
        f"{h}# The L0-matched view\n\nEvery coefficient of the frontier variant:\n\n{frontier_table(rows)}"
    )
    parts.append(
        "Each method interpolated at common L0 values (linear in log L0; log MSE, log MSE_st; inside the "
        f"range that every method covers):\n\n{matched_table(payload['l0_matched'])}"
    )
    gsnr = gsnr_table(rows)
    if gsnr:
        parts.append(f"{h}# Gradient signal-to-noise ratio during training\n\n{gsnr}")
    return "\n".join(parts)


def plot_results(rows: list[ResultRow], path: Path, title: str = "") -> None:
    """Grouped bars (methods x architecture/variant) of the paper view: log2 MSE, log2 MSE_st, L0, Δ LM loss %."""
    plt = pyplot()
    chosen = paper_rows(rows)
    panels = (
        ("log2_mse", "log2 MSE"),
        ("log2_mse_st", "log2 MSE_st (Table 11)"),
        ("l0", "L0"),
        ("delta_lm_loss_pct", "Δ LM loss %"),
    )
    groups = list(dict.fromkeys((r.arch, r.variant) for r in chosen))
    methods = [m for m in METHODS if any(r.method == m for r in chosen)]
    by_key = {(r.arch, r.variant, r.method): r for r in chosen}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    width = 0.8 / max(len(groups), 1)
    for ax, (key, name) in zip(axes, panels, strict=True):
        for i, (arch, variant) in enumerate(groups):
            xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(methods))]
            ys = [
                by_key[(arch, variant, m)].metrics[key] if (arch, variant, m) in by_key else float("nan")
                for m in methods
            ]
            bars = ax.bar(xs, ys, width=width, label=f"{arch}, {variant}")
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods])
        ax.set_title(name, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(f"{title}: fixed coefficients", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontiers(rows: list[ResultRow], path: Path, title: str = "") -> None:
    """MSE, MSE_st and Δ LM loss % against L0 (log), one row per architecture, one line per method."""
    plt = pyplot()
    chosen = frontier_rows(rows)
    archs = sorted({r.arch for r in chosen}) or ["–"]
    fig, axes = plt.subplots(len(archs), len(FRONTIER_METRICS), figsize=(4.4 * len(FRONTIER_METRICS), 3.4 * len(archs)),
                             squeeze=False)  # fmt: skip
    for row_axes, arch in zip(axes, archs, strict=True):
        for ax, (key, name, log_y) in zip(row_axes, FRONTIER_METRICS, strict=True):
            for method in METHODS:
                curve = sorted(
                    (r for r in chosen if r.arch == arch and r.method == method),
                    key=lambda r: r.metrics["l0"],
                )
                if curve:
                    ax.plot([r.metrics["l0"] for r in curve], [r.metrics[key] for r in curve], marker="o",
                            label=METHOD_LABELS[method])  # fmt: skip
            ax.set_xscale("log")
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("L0")
            ax.set_title(f"{arch}: {name}", fontsize=10)
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    if title:
        variant = chosen[0].variant if chosen else ""
        fig.suptitle(f"{title}: frontiers (variant {variant})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
