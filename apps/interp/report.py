"""The auto-interpretability section of docs/results.md, rendered from the study's `interp.json` files (one per
method): the paper's rubric figures beside ours, differences between methods with bootstrap CIs, detection,
the judge's verdict, the judge-free proxies (with the random-direction baseline) and the command to rerun the
study with a strong judge. Every number comes from the files."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apps.interp import metrics
from train.sequences import METHOD_LABELS

# The FAST paper's figures (arXiv 2506.07691: abstract, §5 and Fig. 4), as fractions.
PAPER = {
    "share_4_5": (
        "Llama-3.2-3B-Instruct, 8X, share scoring 4-5",
        {"fast": 0.211, "bt-f": 0.102, "bt-p": 0.070},
    ),
    "cdf_3": ("Qwen2.5-3B-Instruct, CDF at 3", {"fast": 0.765, "bt-f": 0.890, "bt-p": 0.922}),
}
OURS = {"share_4_5": "share 4-5", "cdf_3": "CDF at 3"}
PROXY_NAMES = {
    "density": "firing density",
    "top_token_share": "top-token share",
    "top_token_entropy": "top-token entropy",
    "special_share": "special-token share",
    "nearest_cosine": "decoder NN cosine",
}
STRONG_JUDGE = ("https://api.openai.com/v1", "gpt-4o")  # an example: any OpenAI-compatible endpoint works


def _pct(share: dict[str, Any] | None) -> str:
    if not share or share.get("value") is None:
        return "–"
    return f"{100 * share['value']:.1f}% [{100 * share['ci_low']:.1f}, {100 * share['ci_high']:.1f}]"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _rows(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _scores(run: dict[str, Any]) -> list[int]:
    return [f["fast_paper"]["score"] for f in run["features"] if (f.get("fast_paper") or {}).get("score")]


def _accuracies(run: dict[str, Any]) -> list[float]:
    return [
        f["detection"]["balanced_accuracy"]
        for f in run["features"]
        if (f.get("detection") or {}).get("balanced_accuracy") is not None
    ]


def differences(runs: dict[str, dict[str, Any]]) -> list[str]:
    """FAST - BT(F) and FAST - BT(P): share 4-5, CDF at 3, mean score and mean detection balanced accuracy,
    each with a 95 % bootstrap CI (features resampled within each SAE)."""
    if "fast" not in runs:
        return ["- no FAST run: no differences."]
    measures: list[tuple[str, Callable[[dict[str, Any]], list[float]], float]] = [
        ("share 4-5", lambda r: [float(s >= 4) for s in _scores(r)], 100.0),
        ("CDF at 3", lambda r: [float(s <= 3) for s in _scores(r)], 100.0),
        ("mean score", lambda r: [float(s) for s in _scores(r)], 1.0),
        ("detection balanced accuracy (mean)", _accuracies, 1.0),
    ]
    lines = []
    for other in ("bt-f", "bt-p"):
        if other not in runs:
            continue
        parts = []
        for name, values, scale in measures:
            a, b = values(runs["fast"]), values(runs[other])
            if not a or not b:
                continue
            d = metrics.unpaired_difference(a, b)
            unit = " pp" if scale == 100.0 else ""
            verdict = "FAST higher" if d.low > 0 else "FAST lower" if d.high < 0 else "not distinguishable"
            parts.append(
                f"{name} {scale * d.estimate:+.3g}{unit} [{scale * d.low:+.3g}, {scale * d.high:+.3g}] ({verdict})"
            )
        label = f"FAST - {METHOD_LABELS[other]}"
        lines.append(f"- {label}: " + ("; ".join(parts) if parts else "nothing scored on both sides") + ".")
    return lines


def study_command(reproduce_dir: str, run: dict[str, Any], url: str, model: str) -> str:
    """The command that reruns the study with the judge at `url` (`model`), with `run`'s settings."""
    settings = run["settings"]
    args = ["fast-steer", "experiment", "interp", "--out", reproduce_dir, "--judge-url", url,
            "--judge-model", model, "--features", str(settings["features"]),
            "--instances", str(settings["collection"]["settings"]["instances"]),
            "--protocol", "all" if len(settings["protocols"]) == 3 else ",".join(settings["protocols"]),
            "--seed", str(settings["seed"])]  # fmt: skip
    return shlex.join(args + (["--controls"] if settings["controls"] else []))


def study_folder(run: dict[str, Any], fallback: str) -> str:
    """The reproduce folder whose SAE `run` scored: the nearest parent of its SAE holding experiment.json."""
    sae = Path(run["settings"]["sae"])
    return next((str(folder) for folder in sae.parents if (folder / "experiment.json").is_file()), fallback)


def interp_markdown(runs: dict[str, dict[str, Any]], reproduce_dir: str, level: int = 2) -> str:
    """The section (see the module docstring) for the runs of each method present."""
    h = "#" * level
    first = next(iter(runs.values()))
    reproduce_dir = study_folder(first, reproduce_dir)
    judge = first["settings"]["judge"]
    parts = [
        f"{h} What a feature means: auto-interpretability, FAST vs BT\n",
        f"Judge: `{judge['model']}` at `{judge['url']}`; {first['settings']['features']} features sampled per SAE "
        f"(seed {first['settings']['seed']}); protocols run: {', '.join(f'`{p}`' for p in first['settings']['protocols'])}"
        f"{', with controls' if first['settings']['controls'] else ''}. "
        "Rendered from [interp/](interp/) (one `interp.json` per method).\n",
        f"{h}# The judge's verdict\n",
    ]
    for method, run in runs.items():
        controls = run["summary"].get("controls")
        verdict = controls["verdict"] if controls else "controls not run: the judge is not validated"
        parts.append(f"- {METHOD_LABELS[method]}: {verdict}.")
    thresholds = next((r["summary"]["controls"]["thresholds"] for r in runs.values() if r["summary"].get("controls")),
                      None)  # fmt: skip
    if thresholds:
        parts.append("\nThresholds: " + "; ".join(f"{k}: {v}" for k, v in thresholds.items()) + ".\n")
    parts.append(
        "\nA judge that fails its controls gives numbers that say nothing about the features; they are shown "
        "for completeness, not as an answer.\n"
    )
    parts.append(f"{h}# The paper's rubric, theirs beside ours\n")
    header = ["", *(METHOD_LABELS[m] for m in runs)]
    rows = []
    for key, (label, paper) in PAPER.items():
        rows.append([f"paper: {label}", *(f"{100 * paper[m]:.1f}%" for m in runs)])
        rows.append([f"ours: {OURS[key]} [95% Wilson CI]",
                     *(_pct((r["summary"]["fast_paper"] or {}).get(key)) for r in runs.values())])  # fmt: skip
    rows.append(
        ["ours: mean score", *(_num((r["summary"]["fast_paper"] or {}).get("mean")) for r in runs.values())]
    )
    rows.append(["ours: expected score (log-probs)",
                 *(_num((r["summary"]["fast_paper"] or {}).get("expected_score_mean")) for r in runs.values())])  # fmt: skip
    rows.append(["ours: histogram 1-5",
                 *(" / ".join(str(v) for v in (r["summary"]["fast_paper"] or {}).get("histogram", {}).values()) or "–"
                   for r in runs.values())])  # fmt: skip
    rows.append(["ours: answers scored / unparseable",
                 *(f"{r['summary']['n_scored']} / {r['summary']['n_parse_failures']}" for r in runs.values())])  # fmt: skip
    parts.append(_rows(header, rows))
    parts.append("Differences (95% bootstrap CI):\n")
    parts.append("\n".join(differences(runs)) + "\n")
    parts.append(f"{h}# Detection and fuzzing (balanced accuracy, chance 0.5)\n")
    rows = []
    for method, run in runs.items():
        for scorer in ("detection", "fuzzing"):
            s = run["summary"].get(scorer)
            if s:
                iqr = f"[{s['iqr'][0]:.3f}, {s['iqr'][1]:.3f}]" if s["iqr"] else "–"
                scored = f"{s['n_features']} / {s.get('n_unexplained', 0)} / {s['n_parse_failures']} of {s['n_items']}"
                rows.append([METHOD_LABELS[method], scorer, _num(s["balanced_accuracy_median"]), iqr,
                             _num(s["share_ge_0_8"]), _num(s["auroc_median"]), scored])  # fmt: skip
    parts.append(
        _rows(
            [
                "SAE",
                "scorer",
                "median",
                "IQR",
                "share >= 0.8",
                "AUROC median",
                "features scored / unexplained / answers unparseable",
            ],
            rows,
        )  # fmt: skip
        if rows
        else "(not run)\n"
    )
    parts.append(f"{h}# What the judge-free proxies say (medians over the sampled features)\n")
    rows = []
    for method, run in runs.items():
        proxies = run["summary"].get("proxies") or metrics.proxy_medians(
            [f.get("proxies") for f in run["features"]]
        )
        rows.append([METHOD_LABELS[method], *(_num(proxies.get(k)) for k in PROXY_NAMES)])
        baseline = ((run["summary"].get("controls") or {}).get("random_sae")) or None
        if baseline:
            l0 = baseline["l0"]
            label = f"random directions, L0 {l0['baseline_mean_l0']:.3g} (matched to {METHOD_LABELS[method]})"
            rows.append([label, *(_num(baseline["proxies"].get(k)) for k in PROXY_NAMES)])
    parts.append(_rows(["SAE", *PROXY_NAMES.values()], rows))
    parts.append(
        "A proxy that reads the same for the random-direction SAE as for a trained one says nothing about "
        "interpretability; where they differ, the trained SAE's features are more lexical (top-token share), "
        "more special-token bound, or more redundant (decoder NN cosine) than chance.\n"
    )
    baselines = [
        (m, r["summary"]["controls"]["random_sae"])
        for m, r in runs.items()
        if (r["summary"].get("controls") or {}).get("random_sae")
    ]
    if baselines:
        parts.append("Random-direction baselines scored by the same judge:\n")
        parts.append("\n".join(
            f"- matched to {METHOD_LABELS[m]}: share 4-5 {_pct((b.get('fast_paper') or {}).get('share_4_5'))}, "
            f"detection median {_num((b.get('detection') or {}).get('balanced_accuracy_median'))}."
            for m, b in baselines
        ) + "\n")  # fmt: skip
    url, model = STRONG_JUDGE
    parts.append(f"{h}# With a strong judge\n")
    parts.append(
        "Any OpenAI-compatible endpoint; the key is read from `FAST_STEER_JUDGE_KEY` (or `OPENAI_API_KEY`) and "
        "never written. The same settings as above, then this report again:\n"
    )
    parts.append(
        "```bash\n"
        + f"export FAST_STEER_JUDGE_KEY=...\n{study_command(reproduce_dir, first, url, model)}\n"
        + shlex.join(
            [
                "fast-steer",
                "experiment",
                "report",
                "--out",
                reproduce_dir,
                "--interp",
                f"{reproduce_dir}/interp",
            ]
        )  # fmt: skip
        + "\n```\n"
    )
    return "\n".join(parts)
