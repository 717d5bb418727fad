"""`fast-steer experiment report`: docs/results.md, generated from the JSON files the experiments wrote.

The reproduce folder's `results.json` (+ its plots) and the steering evaluation's `steer_eval.json` (+ its
plot) are copied beside the document, and every number in the document is rendered from those copies:
nothing is typed in by hand. The verdicts ("does FAST beat BT(F) at matched L0?") are computed here too;
a notes file may add prose (the reading of the results) but no numbers are taken from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from steer.errors import MissingFileError
from train.results_table import RESULTS_FILE, results_markdown, rows_from_payload
from train.sequences import METHOD_LABELS

RESULT_FILES = (RESULTS_FILE, "results.png", "frontier.png")
STEER_FILES = ("steer_eval.json", "steer_eval.png")


def copy_results(reproduce_dir: Path, steer_dir: Path | None, doc: Path) -> dict[str, Path]:
    """Copy the experiment's result files next to `doc` (`results/`, `steer_eval/`); returns the copies."""
    copies: dict[str, Path] = {}
    for folder, names, sub in (
        (reproduce_dir, RESULT_FILES, "results"),
        (steer_dir, STEER_FILES, "steer_eval"),
    ):
        if folder is None:
            continue
        target = doc.parent / sub
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            source = folder / name
            if not source.is_file():
                raise MissingFileError(f"{source} is missing: run the experiment that writes it first")
            if source.resolve() != (target / name).resolve():  # a report rebuilt from its own copies
                shutil.copyfile(source, target / name)
            copies[name] = target / name
    return copies


def fast_verdicts(payload: dict[str, Any]) -> list[str]:
    """One line per (architecture, baseline, metric): at how many of the L0-matched points FAST is lower."""
    lines = []
    for arch, entry in payload["l0_matched"].items():
        if not entry["l0"]:
            lines.append(f"- {arch}: no L0-matched comparison ({entry['why']}).")
            continue
        fast = entry["methods"].get("fast")
        for method, values in entry["methods"].items():
            if method == "fast" or fast is None:
                continue
            for key, name in (("mse", "MSE"), ("mse_st", "MSE_st"), ("delta_lm_loss_pct", "Δ LM loss %")):
                pairs = [
                    (f, b)
                    for f, b in zip(fast[key], values[key], strict=True)
                    if f is not None and b is not None
                ]
                wins = sum(f < b for f, b in pairs)
                ratios = (
                    ", ".join(f"{b / f:.3g}" if f else "–" for f, b in pairs)
                    if key != "delta_lm_loss_pct"
                    else ""
                )
                detail = f" ({METHOD_LABELS[method]} / FAST: {ratios})" if ratios else ""
                lines.append(
                    f"- {arch}, FAST vs {METHOD_LABELS[method]}, {name}: FAST lower at {wins} of {len(pairs)} "
                    f"matched L0 values ({', '.join(f'{x:.0f}' for x in entry['l0'])}){detail}."
                )
    return lines


def gsnr_verdicts(payload: dict[str, Any]) -> list[str]:
    """Per variant and architecture: the methods ordered by mean W_enc GSNR."""
    rows = [r for r in rows_from_payload(payload) if r.paper_view and r.extra.get("gsnr")]
    lines = []
    for variant, arch in dict.fromkeys((r.variant, r.arch) for r in rows):
        group = sorted((r for r in rows if (r.variant, r.arch) == (variant, arch)),
                       key=lambda r: -r.extra["gsnr"]["W_enc"])  # fmt: skip
        order = " > ".join(f"{METHOD_LABELS[r.method]} ({r.extra['gsnr']['W_enc']:.3g})" for r in group)
        lines.append(f"- {variant}, {arch}: W_enc GSNR {order}.")
    return lines


def recipe_verdict(payload: dict[str, Any]) -> list[str]:
    """The main job's architecture against the study: FAST's fixed-coefficient SAEs in the variant the main
    job trains (position 0 left out), ordered by held-out Δ LM loss %."""
    from apps.jobs.main_job import MainJobConfig

    job = MainJobConfig()
    variant = "no-first" if job.exclude_first_token else "all"
    rows = sorted(
        (r for r in rows_from_payload(payload)
         if r.paper_view and (r.method, r.variant) == ("fast", variant) and "delta_lm_loss_pct" in r.metrics),
        key=lambda r: r.metrics["delta_lm_loss_pct"],
    )  # fmt: skip
    if not rows:
        return []
    order = ", ".join(f"{r.arch} {r.metrics['delta_lm_loss_pct']:.3g}" for r in rows)
    return [
        f"- main job recipe: FAST, {variant}, fixed coefficients, Δ LM loss %: {order}; the main job trains "
        f"`{job.arch}` (`MainJobConfig.arch`), {'the' if job.arch == rows[0].arch else 'not the'} lowest."
    ]


def _command_block(commands: list[str]) -> str:
    return "```bash\n" + "\n".join(commands) + "\n```\n"


def render(
    payload: dict[str, Any],
    steer: dict[str, Any] | None,
    notes: str = "",
    interp: dict[str, dict[str, Any]] | None = None,
    reproduce_dir: str = "OUT",
) -> str:
    """The whole document from the copied JSON payloads (and optional prose notes); `interp`: the study's
    `interp.json` per method (`apps.interp.study.load_runs`)."""
    from apps.evaluation.steer_eval import report_markdown

    commands = [payload["command"]] if payload.get("command") else []
    if steer:
        trained_by = [sae.get("trained_by") for sae in steer["settings"].get("saes", {}).values()]
        commands += [c for c in dict.fromkeys([*trained_by, steer["settings"].get("command")]) if c]
    parts = [
        f"# Results: FAST vs block training on {payload['model']}, and special-token steering\n",
        "Generated by `fast-steer experiment report` from [results/results.json](results/results.json)"
        + (" and [steer_eval/steer_eval.json](steer_eval/steer_eval.json)" if steer else "")
        + ", which the commands below wrote; every number here is rendered from those files.\n",
        "## Commands, as run\n\n" + (_command_block(commands) if commands else "(not recorded)\n"),
    ]
    env = payload.get("environment")
    if env:
        parts.append("## Environment\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in env.items()) + "\n")
    parts.append("## Verdicts (computed from the tables below)\n")
    parts.append("\n".join(fast_verdicts(payload) + gsnr_verdicts(payload) + recipe_verdict(payload)) + "\n")
    if steer:
        parts.append("\n".join(steering_verdicts(steer)) + "\n")
    if notes.strip():
        parts.append(notes.strip() + "\n")
    parts.append("![frontiers](results/frontier.png)\n\n![fixed coefficients](results/results.png)\n")
    parts.append(results_markdown(payload, level=2))
    if steer:
        parts.append("![steer-eval](steer_eval/steer_eval.png)\n")
        parts.append(report_markdown(steer, level=2))
    if interp:
        from apps.interp.report import interp_markdown

        parts.append(interp_markdown(interp, reproduce_dir, level=2))
    return "\n".join(parts)


def steering_verdicts(steer: dict[str, Any]) -> list[str]:
    """Each condition's test difference from plain (prompt-level strict), with whether its CI excludes 0."""
    lines = []
    for name, cond in steer["conditions"].items():
        if name == "plain":
            continue
        row = cond["test"][0]
        d = row["diff_vs_plain"]["prompt_level_strict_acc"]
        verdict = "above" if d["low"] > 0 else "below" if d["high"] < 0 else "not distinguishable from"
        arc = cond["arc"]["diff_vs_plain"]["acc"]
        lines.append(
            f"- {cond['label']} (s={row['strength']:g}): IFEval prompt-level strict {d['estimate']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] vs plain, {verdict} plain; ARC-Easy {arc['estimate']:+.3f} "
            f"[{arc['low']:+.3f}, {arc['high']:+.3f}]."
        )
        if "sweet_spot" in cond:
            lines.append(f"  - sweet spot: {cond['sweet_spot']['statement']}")
    return lines


def copy_interp(interp: list[Path], doc: Path) -> dict[str, dict[str, Any]]:
    """The study's `interp.json` per method (`apps.interp.study.load_runs`), copied to `interp/<method>/`
    beside `doc`; the copies' content."""
    from apps.interp.run import INTERP_FILE
    from apps.interp.study import load_runs

    runs = load_runs(interp)
    for method, run in runs.items():
        target = doc.parent / "interp" / method
        target.mkdir(parents=True, exist_ok=True)
        (target / INTERP_FILE).write_text(
            json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return load_runs([doc.parent / "interp" / method for method in runs])


def write_doc(
    reproduce_dir: Path,
    steer_dir: Path | None,
    doc: Path,
    notes: Path | None = None,
    interp: list[Path] | None = None,
) -> Path:
    """Copy the result files beside `doc` and write `doc` from the copies (`interp`: the study's run
    folders, or folders holding one per method)."""
    copies = copy_results(reproduce_dir, steer_dir, doc)
    runs = copy_interp(interp, doc) if interp else None
    payload = json.loads(copies[RESULTS_FILE].read_text(encoding="utf-8"))
    steer = json.loads(copies["steer_eval.json"].read_text(encoding="utf-8")) if steer_dir else None
    notes_text = notes.read_text(encoding="utf-8") if notes else ""
    doc.write_text(render(payload, steer, notes_text, runs, str(reproduce_dir)), encoding="utf-8")
    return doc
