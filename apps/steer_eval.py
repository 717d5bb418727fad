"""The steering evaluation: does adding a feature at special positions help IFEval, and does FAST's help more?

Conditions (all greedy, chat template applied):
- `plain`: the model as it is;
- `prompt`: a system prompt asking for careful, complete instruction following (`SYSTEM_PROMPT`);
- `fast`, `btf`: the top `<|im_start|>` feature (App. F selection) of the FAST / BT(F) SAE, op `add` at
  special positions, at strengths in % of the median special-position residual norm (as the sweep);
- `random`: a seeded random unit direction, stored as a one-feature SAE folder (`random_direction/`),
  steered with the same op, strengths and positions: any push at special tokens, not a feature.

Protocol: IFEval is split into disjoint seeded dev / test sets; each steering method's strength is the one
with the best dev prompt-level strict accuracy (ties: the smaller strength), and only that strength (plus
the largest, to see whether the effect turns over) is run on test. ARC-Easy (log-likelihood accuracy) is
the capability check at each method's chosen strength. Every difference from `plain` has a paired
bootstrap CI over the same items. Each (condition, strength, split) cell is cached in `cells/` and reused
while its settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apps.bootstrap import RESAMPLES, Interval, bootstrap_ratio, paired_difference
from apps.lm_eval_tasks import ARC_EASY_FILES, ARC_EASY_TASK, IFEVAL_FILES, IFEVAL_TASK, materialize_tasks
from apps.steering_sweep import (
    DEFAULT_EVAL_DATA,
    added_norm,
    distinct_3gram_share,
    lm_eval_run,
    special_residual_norm,
    top_anchor_feature,
)
from steer import Edit, Intervention
from steer.sae import SAE
from train.experiment import run_environment

log = logging.getLogger(__name__)

STRENGTHS = (15.0, 25.0, 50.0, 100.0, 150.0, 200.0)  # the paper's grid, in % of the special-position norm
SYSTEM_PROMPT = (
    "You are a careful assistant. Read the user's request closely and follow every instruction in it "
    "completely and exactly, including any constraints on format, length, wording and punctuation."
)
IFEVAL_METRICS = (
    "prompt_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_strict_acc",
    "inst_level_loose_acc",
)
SELECTION_METRIC = "prompt_level_strict_acc"
ARC_METRIC = "acc"
STEERED = ("fast", "random", "btf")
BASELINES = ("plain", "prompt")
LABELS = {
    "plain": "plain",
    "prompt": "prompt-only",
    "fast": "FAST top feature",
    "random": "random direction",
    "btf": "BT(F) top feature",
}
RANDOM_DIR = "random_direction"
EXAMPLES = 3


@dataclass
class SteerEvalConfig:
    """What the evaluation measures; `out` is the folder it writes (`<reproduce folder>/steer_eval`)."""

    fast_sae: Path
    btf_sae: Path
    out: Path
    strengths: tuple[float, ...] = STRENGTHS
    dev: int = 100  # IFEval prompts to choose strengths on
    test: int = 200  # disjoint IFEval prompts to report on
    arc: int = 200  # ARC-Easy test items
    max_new_tokens: int = 256
    eval_data: Path = DEFAULT_EVAL_DATA
    batch_size: int = 8
    seed: int = 0  # split, random direction and bootstrap seeds derive from it
    resamples: int = RESAMPLES

    def __post_init__(self) -> None:
        self.fast_sae, self.btf_sae = Path(self.fast_sae), Path(self.btf_sae)
        self.out, self.eval_data = Path(self.out), Path(self.eval_data)
        for name, folder in (("FAST", self.fast_sae), ("BT(F)", self.btf_sae)):
            if not (folder / "cfg.json").is_file():
                raise FileNotFoundError(
                    f"{name} SAE folder {folder} has no cfg.json (expected an SAE folder)"
                )
        if (
            not self.strengths
            or any(s <= 0 for s in self.strengths)
            or len(set(self.strengths)) != len(self.strengths)
        ):
            raise ValueError(
                f"strengths must be distinct positive numbers (plain is its own condition), got {list(self.strengths)}"
            )
        self.strengths = tuple(sorted(self.strengths))
        for name in ("dev", "test", "arc", "max_new_tokens", "batch_size", "resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.eval_data / IFEVAL_FILES[0]).is_file():
            raise FileNotFoundError(f"no {IFEVAL_FILES[0]} in {self.eval_data}")


@dataclass(frozen=True)
class Condition:
    """One way to run the model: an optional steering feature and an optional system prompt."""

    name: str
    sae: SAE | None = None
    sae_dir: str | None = None
    feature: int | None = None
    feature_mean_max_activation: float | None = None
    system: str | None = None

    def spec(self, layer: int, alpha: float) -> Intervention | None:
        if self.sae is None or alpha == 0:
            return None
        return Intervention(layer=layer, sae=self.sae, edits=[Edit(self.feature, "add", alpha)])


@dataclass
class Cell:
    """The per-item results of one (condition, strength, split): IFEval or ARC-Easy."""

    condition: str
    strength: float
    alpha: float
    split: str  # "dev", "test" or "arc"
    doc_ids: list[int]
    metrics: dict[str, list[tuple[float, float]]]  # metric -> per-item (hits, total), in doc_ids order
    replies: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def score(self, metric: str) -> float:
        items = self.metrics[metric]
        return sum(h for h, _ in items) / sum(t for _, t in items)


def split_items(n_items: int, n_dev: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint dev and test document indices drawn from `range(n_items)` by a seeded permutation."""
    if n_dev + n_test > n_items:
        raise ValueError(f"dev {n_dev} + test {n_test} prompts exceed the {n_items} IFEval prompts available")
    order = np.random.default_rng(seed).permutation(n_items)
    return sorted(int(i) for i in order[:n_dev]), sorted(int(i) for i in order[n_dev : n_dev + n_test])


def choose_strength(scores: dict[float, float]) -> float:
    """The strength with the best score; ties go to the smaller strength."""
    if not scores:
        raise ValueError("no strengths to choose from")
    return min(scores, key=lambda s: (-scores[s], s))


def reply_stats(
    replies: list[str], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> dict[str, float]:
    """Length, distinct-1/2, repetition and ended-share of `replies`.

    `distinct_n`: distinct word n-grams / all word n-grams over all replies. `repetition`: the mean over
    replies of the share of a reply's word 3-grams that repeat an earlier one in it. `ended`: the share of
    replies shorter than the token limit; generation stops early only at `<|im_end|>` (the EOS), so this is
    the share that ended on it (lengths are measured by re-tokenising the reply text).
    """
    tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    return {
        "mean_tokens": statistics.fmean(tokens),
        "mean_words": statistics.fmean(len(r.split()) for r in replies),
        "distinct_1": _distinct(replies, 1),
        "distinct_2": _distinct(replies, 2),
        "repetition": statistics.fmean(1 - distinct_3gram_share([r]) for r in replies),
        "ended": sum(n < max_new_tokens for n in tokens) / len(tokens),
    }


def _distinct(texts: list[str], n: int) -> float:
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def random_direction_sae(d_in: int, layer: int, seed: int, folder: Path, model_ref: str) -> Path:
    """Write a one-feature SAE folder whose decoder row is a seeded random unit vector (and return it)."""
    from hub.sae_io import sae_metadata, save_sae
    from steer.sae import SAEConfig, build_sae

    meta = sae_metadata(model_ref, layer, method="random-direction", seed=seed)
    sae = build_sae(SAEConfig(architecture="standard", d_in=d_in, d_sae=1, metadata=meta))
    direction = torch.randn(d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec[0] = (direction / direction.norm()).to(sae.W_dec.dtype)
    return save_sae(sae, folder)


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over an SAE folder's `cfg.json` and weight files, so a retrained SAE invalidates its cells."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name == "cfg.json" or path.suffix in (".safetensors", ".pt", ".bin"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class CellRunner:
    """Runs cells through lm-eval, or reads them back from `cells/` when their settings match."""

    def __init__(
        self, cfg: SteerEvalConfig, model, tokenizer, layer: int, norm: float, task_manager, key: dict
    ):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.layer, self.norm, self.task_manager, self.key = layer, norm, task_manager, key
        self.folder = cfg.out / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def run(self, condition: Condition, strength: float, split: str, doc_ids: list[int]) -> Cell:
        alpha = added_norm(strength, self.norm)
        name = f"{condition.name}_{strength:g}_{split}"
        path = self.folder / f"{name}.json"
        key = {
            **self.key,
            "condition": condition.name,
            "sae_dir": condition.sae_dir,
            "sae_sha256": folder_digest(condition.sae_dir) if condition.sae_dir else None,
            "feature": condition.feature,
            "system": condition.system,
            "alpha": alpha,
            "split": split,
            "max_new_tokens": None if split == "arc" else self.cfg.max_new_tokens,
            "doc_ids_sha256": hashlib.sha256(json.dumps(doc_ids).encode()).hexdigest(),
        }
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                self.reused.append(name)
                return _cell_from_json(stored["cell"])
        start = time.perf_counter()
        task = ARC_EASY_TASK if split == "arc" else IFEVAL_TASK
        options: dict[str, Any] = {"samples": {task: doc_ids}, "log_samples": True}
        if condition.system:
            options["system_instruction"] = condition.system
        if task == IFEVAL_TASK:
            options["gen_kwargs"] = {"max_gen_toks": self.cfg.max_new_tokens}
        out = lm_eval_run(
            self.model,
            self.tokenizer,
            condition.spec(self.layer, alpha),
            [task],
            self.task_manager,
            self.cfg.batch_size,
            **options,
        )
        cell = _cell_from_samples(condition.name, strength, alpha, split, out["samples"][task])
        cell.wall_s = time.perf_counter() - start
        path.write_text(
            json.dumps({"key": key, "cell": asdict(cell)}, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        self.computed.append(name)
        return cell


def _cell_from_samples(condition: str, strength: float, alpha: float, split: str, samples: list) -> Cell:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if split == "arc":
        metrics = {ARC_METRIC: [(float(s[ARC_METRIC]), 1.0) for s in samples]}
        return Cell(condition, strength, alpha, split, [s["doc_id"] for s in samples], metrics)
    metrics: dict[str, list[tuple[float, float]]] = {}
    for metric in IFEVAL_METRICS:
        if metric.startswith("inst_"):
            metrics[metric] = [(float(sum(s[metric])), float(len(s[metric]))) for s in samples]
        else:
            metrics[metric] = [(float(s[metric]), 1.0) for s in samples]
    return Cell(
        condition,
        strength,
        alpha,
        split,
        [s["doc_id"] for s in samples],
        metrics,
        replies=[s["filtered_resps"][0] for s in samples],
        prompts=[s["doc"]["prompt"] for s in samples],
    )


def _cell_from_json(data: dict) -> Cell:
    data["metrics"] = {k: [tuple(item) for item in v] for k, v in data["metrics"].items()}
    return Cell(**data)


def run_steer_eval(
    cfg: SteerEvalConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    model_ref: str = "default",
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """The whole evaluation; writes `steer_eval.{json,md,png}` (and `cells/`) into `cfg.out`.
    `command`: the command line, recorded in the settings."""
    from lm_eval.tasks import TaskManager
    from tqdm.auto import tqdm

    from hub.sae_io import load_sae, sae_layer

    start = time.perf_counter()
    nltk_data = cfg.eval_data.resolve().parent / "nltk_data"
    fast = load_sae(cfg.fast_sae, device=model.device)
    btf = load_sae(cfg.btf_sae, device=model.device)
    layer = sae_layer(fast)
    if layer is None or sae_layer(btf) != layer:
        raise ValueError(
            f"the FAST SAE ({cfg.fast_sae}, layer {layer}) and the BT(F) SAE ({cfg.btf_sae}, layer "
            f"{sae_layer(btf)}) must name the same residual-stream layer in their metadata"
        )
    n_ifeval = _count_lines(cfg.eval_data / IFEVAL_FILES[0])
    n_arc = _count_lines(cfg.eval_data / ARC_EASY_FILES[-1])
    if cfg.arc > n_arc:
        raise ValueError(f"--arc {cfg.arc} exceeds the {n_arc} ARC-Easy test items in {cfg.eval_data}")
    dev_ids, test_ids = split_items(n_ifeval, cfg.dev, cfg.test, cfg.seed)
    norm = special_residual_norm(model, tokenizer, layer, conversations)
    random_dir = random_direction_sae(
        int(model.config.hidden_size), layer, cfg.seed, cfg.out / RANDOM_DIR, model_ref
    )
    conditions = {"plain": Condition("plain"), "prompt": Condition("prompt", system=SYSTEM_PROMPT)}
    for name, sae, folder in (("fast", fast, cfg.fast_sae), ("btf", btf, cfg.btf_sae)):
        feature, activation = top_anchor_feature(model, tokenizer, sae, layer, conversations, progress)
        conditions[name] = Condition(name, sae, str(folder), feature, activation)
    conditions["random"] = Condition(
        "random", load_sae(random_dir, device=model.device), str(random_dir), feature=0
    )
    key = {
        "model": model_ref,
        "layer": layer,
        "eval_data": str(cfg.eval_data.resolve()),
    }
    with tempfile.TemporaryDirectory(prefix="fast-steer-steer-eval-tasks-") as tmp:
        local = materialize_tasks(cfg.eval_data, tmp)
        missing = [t for t in (IFEVAL_TASK, ARC_EASY_TASK) if t not in local.tasks]
        if missing:
            raise FileNotFoundError(
                f"{cfg.eval_data}: missing the data for {', '.join(missing)} (ifeval_input_data.jsonl with "
                f"{nltk_data}, arc_easy_{{train,validation,test}}.jsonl)"
            )
        runner = CellRunner(
            cfg,
            model,
            tokenizer,
            layer,
            norm,
            TaskManager(include_path=str(local.include_path), include_defaults=False),
            key,
        )
        planned = len(BASELINES) * 3 + len(STEERED) * (len(cfg.strengths) + 3)
        bar = tqdm(total=planned, desc="steer-eval cells", unit="cell", disable=not progress)

        def cell(condition: str, strength: float, split: str) -> Cell:
            bar.set_postfix_str(f"{condition} s={strength:g} {split}")
            ids = {"dev": dev_ids, "test": test_ids, "arc": list(range(cfg.arc))}[split]
            result = runner.run(conditions[condition], strength, split, ids)
            bar.update()
            return result

        results = _run_cells(cfg, cell)
        bar.close()
    summary = _summary(cfg, results, conditions, tokenizer)
    report = {
        "settings": {
            "model": model_ref,
            "layer": layer,
            "fast_sae": str(cfg.fast_sae),
            "btf_sae": str(cfg.btf_sae),
            "random_direction_sae": str(random_dir),
            "random_direction_seed": cfg.seed,
            "strengths": list(cfg.strengths),
            "ifeval_dev": cfg.dev,
            "ifeval_test": cfg.test,
            "arc_easy_test_items": cfg.arc,
            "max_new_tokens": cfg.max_new_tokens,
            "system_prompt": SYSTEM_PROMPT,
            "selection": f"best dev {SELECTION_METRIC} per steering method (ties: smaller strength)",
            "bootstrap": {
                "resamples": cfg.resamples,
                "level": 0.95,
                "seed": cfg.seed,
                "paired": "per prompt / item",
            },
            "residual_norm_median": norm,
            "scaling": (
                f"strength s adds s/100 x {norm:.2f} (median residual norm at special positions of layer {layer}, "
                f"position 0 left out, over {len(conversations)} held-out conversations) along the unit decoder "
                "direction, op add, at special positions"
            ),
            "command": command,
            "environment": run_environment(str(model.device)),
        },
        "split": {
            "seed": cfg.seed,
            "ifeval_prompts": n_ifeval,
            "dev_doc_ids": dev_ids,
            "test_doc_ids": test_ids,
        },
        "conditions": summary,
        "cells": {"computed": runner.computed, "reused": runner.reused},
        "wall_s": time.perf_counter() - start,
    }
    write_report(report, cfg.out)
    return report


def _count_lines(path: Path) -> int:
    """Non-empty lines of a JSONL file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _run_cells(cfg: SteerEvalConfig, cell: Callable[[str, float, str], Cell]) -> dict[str, dict]:
    """Every cell the protocol needs, per condition: dev rows, the chosen strength, test rows, ARC."""
    results: dict[str, dict] = {}
    for name in BASELINES:
        results[name] = {"dev": [cell(name, 0.0, "dev")], "chosen": 0.0}
        results[name]["test"] = [cell(name, 0.0, "test")]
        results[name]["arc"] = cell(name, 0.0, "arc")
    for name in STEERED:
        dev = [cell(name, s, "dev") for s in cfg.strengths]
        chosen = choose_strength({c.strength: c.score(SELECTION_METRIC) for c in dev})
        test = [cell(name, chosen, "test")]
        if chosen != cfg.strengths[-1]:
            test.append(cell(name, cfg.strengths[-1], "test"))
        results[name] = {"dev": dev, "chosen": chosen, "test": test, "arc": cell(name, chosen, "arc")}
    return results


def _summary(
    cfg: SteerEvalConfig, results: dict[str, dict], conditions: dict[str, Condition], tokenizer
) -> dict:
    plain = results["plain"]
    boot = {"resamples": cfg.resamples, "seed": cfg.seed}
    summary: dict[str, dict] = {}
    for name, res in results.items():
        cond = conditions[name]
        summary[name] = {
            "label": LABELS[name],
            "sae_dir": cond.sae_dir,
            "feature": cond.feature,
            "feature_mean_max_activation": cond.feature_mean_max_activation,
            "system_prompt": cond.system,
            "chosen_strength": res["chosen"],
            "dev": [_row(c, plain["dev"][0], boot) for c in res["dev"]],
            "test": [
                {**_row(c, plain["test"][0], boot), **_reply_part(c, tokenizer, cfg.max_new_tokens)}
                for c in res["test"]
            ],
            "arc": _row(res["arc"], plain["arc"], boot),
        }
        if name in STEERED:
            summary[name]["sweet_spot"] = _sweet_spot(res["test"], plain["test"][0], boot)
    return summary


def _row(cell: Cell, plain: Cell, boot: dict) -> dict:
    if cell.doc_ids != plain.doc_ids:
        raise ValueError(f"cell {cell.condition} {cell.split} covers other items than plain's")
    return {
        "strength": cell.strength,
        "alpha": cell.alpha,
        "items": len(cell.doc_ids),
        "metrics": {
            m: asdict(bootstrap_ratio(items, boot["resamples"], boot["seed"]))
            for m, items in cell.metrics.items()
        },
        "diff_vs_plain": {
            m: asdict(paired_difference(items, plain.metrics[m], boot["resamples"], boot["seed"]))
            for m, items in cell.metrics.items()
        },
        "wall_s": cell.wall_s,
    }


def _reply_part(cell: Cell, tokenizer, max_new_tokens: int) -> dict:
    return {
        "reply_stats": reply_stats(cell.replies, tokenizer, max_new_tokens),
        "examples": [
            {"prompt": p, "reply": r}
            for p, r in list(zip(cell.prompts, cell.replies, strict=True))[:EXAMPLES]
        ],
    }


def _sweet_spot(test: list[Cell], plain: Cell, boot: dict) -> dict:
    """Whether the chosen (moderate) strength beats plain and the largest strength falls below it, on test."""
    chosen = test[0]
    better = paired_difference(chosen.metrics[SELECTION_METRIC], plain.metrics[SELECTION_METRIC], **boot)
    if len(test) == 1:
        return {
            "appears": False,
            "moderate_minus_plain": asdict(better),
            "largest_minus_moderate": None,
            "statement": f"no: the largest strength ({chosen.strength:g}) was the best on dev, so nothing turns over",
        }
    worse = paired_difference(test[1].metrics[SELECTION_METRIC], chosen.metrics[SELECTION_METRIC], **boot)
    appears = better.low > 0 and worse.high < 0
    return {
        "appears": appears,
        "moderate_minus_plain": asdict(better),
        "largest_minus_moderate": asdict(worse),
        "statement": (
            f"{'yes' if appears else 'no'}: s={chosen.strength:g} minus plain {_fmt(better)}, "
            f"s={test[1].strength:g} minus s={chosen.strength:g} {_fmt(worse)} (test {SELECTION_METRIC}; "
            "a sweet spot needs the first CI above 0 and the second below 0)"
        ),
    }


def _fmt(interval: Interval | dict) -> str:
    i = interval if isinstance(interval, dict) else asdict(interval)
    return f"{i['estimate']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]"


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
    h = "#" * (level + 1)
    lines = [
        f"{'#' * level} Steering evaluation: IFEval (dev-chosen strength, test reported) and ARC-Easy\n",
        f"- model `{s['model']}`, layer {s['layer']}; FAST SAE `{s['fast_sae']}`, BT(F) SAE `{s['btf_sae']}`",
        f"- IFEval: {s['ifeval_dev']} dev / {s['ifeval_test']} test prompts (disjoint, seed {report['split']['seed']}), "
        f"greedy, at most {s['max_new_tokens']} new tokens; ARC-Easy: {s['arc_easy_test_items']} test items",
        f"- scaling: {s['scaling']}",
        f"- steered features: FAST {conds['fast']['feature']} (mean max activation on `<|im_start|>` "
        f"{conds['fast']['feature_mean_max_activation']:.3f}), BT(F) {conds['btf']['feature']} "
        f"({conds['btf']['feature_mean_max_activation']:.3f})",
        f"- random direction: a seeded (seed {s['random_direction_seed']}) random unit vector stored as the "
        f"one-feature SAE `{s['random_direction_sae']}`, steered with the same op, strengths and positions",
        f"- strength choice: {s['selection']}; CIs: paired percentile bootstrap, "
        f"{s['bootstrap']['resamples']} resamples, 95%",
        f"- wall time {report['wall_s']:.0f} s\n",
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
                f"{arc['metrics']['acc']['estimate']:.3f} | {_fmt(arc['diff_vs_plain']['acc'])}"
                if row["strength"] == c["chosen_strength"]
                else "– | –"
            )
            lines.append(
                f"| {c['label']} | {row['strength']:g} | {m['prompt_level_strict_acc']['estimate']:.3f} "
                f"| {_fmt(d['prompt_level_strict_acc'])} | {m['prompt_level_loose_acc']['estimate']:.3f} "
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
                f"| {_fmt(row['diff_vs_plain']['prompt_level_strict_acc'])} |"
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
