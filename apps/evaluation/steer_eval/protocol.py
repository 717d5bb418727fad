"""The protocol: dev sweep, strength choice, test and ARC cells, paired bootstrap summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apps.evaluation.lm_eval.tasks import (
    ARC_EASY_FILES,
    ARC_EASY_TASK,
    IFEVAL_FILES,
    IFEVAL_TASK,
    local_task_manager,
)
from apps.evaluation.primitives import scale_note
from apps.evaluation.stats import bootstrap_ratio, format_interval, paired_difference
from apps.evaluation.steer_eval.cells import CellRunner, random_direction_sae, run_key
from apps.evaluation.steer_eval.config import (
    BASELINES,
    EXAMPLES,
    LABELS,
    RANDOM_DIR,
    SELECTION_METRIC,
    STEERED,
    SYSTEM_PROMPT,
    Cell,
    Condition,
    SteerEvalConfig,
    choose_strength,
    split_items,
)
from apps.evaluation.steer_eval.provenance import sae_provenance
from apps.evaluation.steer_eval.replies import reply_stats
from apps.evaluation.steer_eval.report import write_report
from hub import describe_device
from steer.chat_template import turn_opening_token
from steer.errors import ConfigError
from steer.sae import dtype_name
from train.experiment import run_environment
from train.features import special_residual_norm, top_anchor_feature


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
    from tqdm.auto import tqdm

    from hub.sae_io import load_sae, sae_layer

    start = time.perf_counter()
    nltk_data = cfg.eval_data.resolve().parent / "nltk_data"
    fast = load_sae(cfg.fast_sae, device=model.device)
    btf = load_sae(cfg.btf_sae, device=model.device)
    layer = sae_layer(fast)
    if layer is None or sae_layer(btf) != layer:
        raise ConfigError(
            f"the FAST SAE ({cfg.fast_sae}, layer {layer}) and the BT(F) SAE ({cfg.btf_sae}, layer "
            f"{sae_layer(btf)}) must name the same residual-stream layer in their metadata"
        )
    n_ifeval = _count_lines(cfg.eval_data / IFEVAL_FILES[0])
    n_arc = _count_lines(cfg.eval_data / ARC_EASY_FILES[-1])
    if cfg.arc > n_arc:
        raise ConfigError(f"--arc {cfg.arc} exceeds the {n_arc} ARC-Easy test items in {cfg.eval_data}")
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
    key = run_key(model_ref, layer, cfg.eval_data, dtype_name(model.dtype), describe_device(model.device),
                  cfg.batch_size)  # fmt: skip
    hint = f" (ifeval_input_data.jsonl with {nltk_data}, arc_easy_{{train,validation,test}}.jsonl)"
    with local_task_manager(cfg.eval_data, (IFEVAL_TASK, ARC_EASY_TASK), hint) as task_manager:
        runner = CellRunner(cfg, model, tokenizer, layer, norm, task_manager, key)
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
            "saes": {"fast": sae_provenance(fast, cfg.fast_sae), "btf": sae_provenance(btf, cfg.btf_sae)},
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
            "anchor_token": turn_opening_token(tokenizer),
            "scaling": f"{scale_note(norm, layer, len(conversations))}, op add, at special positions",
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
            "statement": (
                f"no: the largest strength ({chosen.strength:g}) was the best on dev, so nothing turns over; "
                f"s={chosen.strength:g} minus plain {format_interval(better)} (test {SELECTION_METRIC})"
            ),
        }
    worse = paired_difference(test[1].metrics[SELECTION_METRIC], chosen.metrics[SELECTION_METRIC], **boot)
    appears = better.low > 0 and worse.high < 0
    return {
        "appears": appears,
        "moderate_minus_plain": asdict(better),
        "largest_minus_moderate": asdict(worse),
        "statement": (
            f"{'yes' if appears else 'no'}: s={chosen.strength:g} minus plain {format_interval(better)}, "
            f"s={test[1].strength:g} minus s={chosen.strength:g} {format_interval(worse)} (test {SELECTION_METRIC}; "
            "a sweet spot needs the first CI above 0 and the second below 0)"
        ),
    }
