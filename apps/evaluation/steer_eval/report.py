"""The steering evaluation's report: JSON, Markdown tables and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from apps.evaluation.stats import format_interval
from apps.evaluation.steer_eval.config import SELECTION_METRIC, STEERED


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """`steer_eval.json`, `steer_eval.md` and `steer_eval.png` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "steer_eval.json",
        "markdown": out / "steer_eval.md",
        "plot": out / "steer_eval.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(report_markdown(report), encoding="utf-8")
    plot_report(report, paths["plot"])
    return paths


def report_markdown(report: dict, level: int = 1) -> str:
    """The test table (with paired CIs against plain), the dev sweep, the sweet-spot verdicts and examples;
    `level` is the heading level of the title (sections one below), to embed it in another document."""
    s, conds = report["settings"], report["conditions"]
    anchor = s.get("anchor_token", "<|im_start|>")  # reports from before it was recorded ran on ChatML
    h = "#" * (level + 1)
    lines = [
        f"{'#' * level} Steering evaluation: IFEval (dev-chosen strength, test reported) and ARC-Easy\n",
        f"- model `{s['model']}`, layer {s['layer']}; FAST SAE `{s['fast_sae']}`, BT(F) SAE `{s['btf_sae']}`",
        f"- IFEval: {s['ifeval_dev']} dev / {s['ifeval_test']} test prompts (disjoint, seed {report['split']['seed']}), "
        f"greedy, at most {s['max_new_tokens']} new tokens; ARC-Easy: {s['arc_easy_test_items']} test items",
        f"- scaling: {s['scaling']}",
        f"- steered features: FAST {conds['fast']['feature']} (mean max activation on `{anchor}` "
        f"{conds['fast']['feature_mean_max_activation']:.3f}), BT(F) {conds['btf']['feature']} "
        f"({conds['btf']['feature_mean_max_activation']:.3f})",
        f"- random direction: a seeded (seed {s['random_direction_seed']}) random unit vector stored as the "
        f"one-feature SAE `{s['random_direction_sae']}`, steered with the same op, strengths and positions",
        f"- strength choice: {s['selection']}; CIs: paired percentile bootstrap, "
        f"{s['bootstrap']['resamples']} resamples, 95%",
        *_environment_line(s.get("environment")),
        f"- wall time {report['wall_s']:.0f} s for this invocation ({len(report['cells']['reused'])} cells reused); "
        f"computing every cell took {_cell_seconds(conds):.0f} s\n",
        *_sae_lines(s.get("saes"), conds, h),
        f"{h} Test split\n",
        "| condition | strength | prompt strict | Δ vs plain [95% CI] | prompt loose | inst strict | inst loose "
        "| ARC-Easy | Δ ARC [95% CI] | tokens | distinct-1 | distinct-2 | repetition | ended |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in conds.values():
        for row in c["test"]:
            m, d, r = row["metrics"], row["diff_vs_plain"], row["reply_stats"]
            arc = c["arc"]
            arc_cells = (
                f"{arc['metrics']['acc']['estimate']:.3f} | {format_interval(arc['diff_vs_plain']['acc'])}"
                if row["strength"] == c["chosen_strength"]
                else "– | –"
            )
            lines.append(
                f"| {c['label']} | {row['strength']:g} | {m['prompt_level_strict_acc']['estimate']:.3f} "
                f"| {format_interval(d['prompt_level_strict_acc'])} | {m['prompt_level_loose_acc']['estimate']:.3f} "
                f"| {m['inst_level_strict_acc']['estimate']:.3f} | {m['inst_level_loose_acc']['estimate']:.3f} "
                f"| {arc_cells} | {r['mean_tokens']:.0f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} "
                f"| {r['repetition']:.3f} | {r['ended']:.2f} |"
            )
    lines += ["", f"{h} Sweet spot (test)\n"]
    lines += [f"- {c['label']}: {c['sweet_spot']['statement']}" for c in conds.values() if "sweet_spot" in c]
    lines += [
        "",
        f"{h} Dev split (prompt-level strict accuracy, Δ vs plain with 95% CI)\n",
        "| condition | strength | prompt strict | Δ vs plain [95% CI] |",
        "|---|---:|---:|---|",
    ]
    for c in conds.values():
        for row in c["dev"]:
            chosen = (
                " (chosen)" if c["feature"] is not None and row["strength"] == c["chosen_strength"] else ""
            )
            lines.append(
                f"| {c['label']} | {row['strength']:g}{chosen} | "
                f"{row['metrics']['prompt_level_strict_acc']['estimate']:.3f} "
                f"| {format_interval(row['diff_vs_plain']['prompt_level_strict_acc'])} |"
            )
    lines += ["", f"{h} Example replies (test, chosen strength)\n"]
    for c in conds.values():
        lines.append(f"{h}# {c['label']} (s={c['chosen_strength']:g})\n")
        lines += [
            f"- **{_one_line(e['prompt'])[:120]}** → {_one_line(e['reply'])[:400]}"
            for e in c["test"][0]["examples"]
        ]
        lines.append("")
    return "\n".join(lines)


def _cell_seconds(conds: dict) -> float:
    """The compute time of all the cells in the report (each cell appears once: dev, test and ARC rows)."""
    return sum(row["wall_s"] for c in conds.values() for row in (*c["dev"], *c["test"], c["arc"]))


def _environment_line(env: dict | None) -> list[str]:
    return [f"- ran on: {', '.join(f'{k} {v}' for k, v in env.items())}"] if env else []


def _sae_lines(saes: dict | None, conds: dict, h: str) -> list[str]:
    """The steered SAEs: how they were trained and how well they reconstruct held-out chats (when the
    steer-eval recorded it)."""
    if not saes:
        return []
    lines = [
        f"{h} Steered SAEs\n",
        "| condition | method | arch. | d_sae | training tokens | position 0 | held-out conv. | L0 | expl. var. "
        "| MSE_st | Δ LM loss % |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    commands: dict[str, list[str]] = {}  # command -> the conditions whose SAE it trained
    for name, sae in saes.items():
        held = sae.get("held_out", {})
        cells = [_number(held.get(k)) for k in ("conversations", "l0", "explained_variance", "mse_st")]
        first = {True: "left out", False: "kept"}.get(sae.get("exclude_first_token"), "–")
        lines.append(
            f"| {conds[name]['label']} | {sae.get('method') or '–'} | {sae.get('architecture') or '–'} "
            f"| {sae.get('d_sae') or '–'} | {_number(sae.get('training_tokens'))} | {first} | "
            + " | ".join(cells)
            + f" | {_number(held.get('delta_lm_loss_pct'))} |"
        )
        if sae.get("trained_by"):
            commands.setdefault(sae["trained_by"], []).append(conds[name]["label"])
    if commands:
        lines += ["", "Trained by:", ""]
        lines += [f"- {', '.join(labels)}: `{command}`" for command, labels in commands.items()]
    return [*lines, ""]


def _number(value: float | int | None) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _one_line(text: str) -> str:
    return text.replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)"


COLORS = {
    "plain": "grey",
    "prompt": "tab:green",
    "fast": "tab:blue",
    "random": "tab:orange",
    "btf": "tab:red",
}


def plot_report(report: dict, path: Path) -> None:
    """Left: dev IFEval prompt-level strict accuracy against strength (95% bootstrap bands), baselines as
    lines. Right: each condition's test difference from plain at its chosen strength, with its paired CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = report["conditions"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    strengths = report["settings"]["strengths"]
    for name, style in (("plain", ":"), ("prompt", "--")):
        m = conds[name]["dev"][0]["metrics"][SELECTION_METRIC]
        ax.axhline(m["estimate"], linestyle=style, linewidth=1, color=COLORS[name])
        ax.axhspan(m["low"], m["high"], color=COLORS[name], alpha=0.1, label=f"{conds[name]['label']}")
    for name in STEERED:
        est = [r["metrics"][SELECTION_METRIC] for r in conds[name]["dev"]]
        ax.plot(
            strengths,
            [e["estimate"] for e in est],
            marker="o",
            color=COLORS[name],
            label=conds[name]["label"],
        )
        ax.fill_between(
            strengths, [e["low"] for e in est], [e["high"] for e in est], color=COLORS[name], alpha=0.15
        )
    ax.set_xlabel("strength s (% of median special-token residual norm)")
    ax.set_ylabel("IFEval prompt-level strict accuracy (dev)")
    ax.legend(fontsize=7)
    names = [n for n in conds if n != "plain"]
    for i, name in enumerate(names):
        d = conds[name]["test"][0]["diff_vs_plain"][SELECTION_METRIC]
        ax2.errorbar(
            [d["estimate"]], [i], xerr=[[d["estimate"] - d["low"]], [d["high"] - d["estimate"]]],
            fmt="o", color=COLORS[name], capsize=3,
        )  # fmt: skip
    ax2.axvline(0, color="grey", linewidth=1)
    ax2.set_yticks(
        range(len(names)), [f"{conds[n]['label']} (s={conds[n]['chosen_strength']:g})" for n in names]
    )
    ax2.set_xlabel("test Δ prompt-level strict vs plain (95% paired CI)")
    s = report["settings"]
    fig.suptitle(
        f"{s['model']} layer {s['layer']}: add at special tokens (IFEval {s['ifeval_dev']} dev / {s['ifeval_test']} test)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
