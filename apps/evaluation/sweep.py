"""The steering sweep: `add` the top feature of the turn-opening token (ChatML `<|im_start|>`) of an SAE at
special positions, at several strengths.

Strengths are on the scale of `apps.evaluation.primitives` (% of the special-position residual norm).

Per strength: greedy replies to a fixed set of prompts, and an lm-eval score (local MMLU subjects, chat
template applied so the special positions exist in every prompt). Written as JSON, Markdown and a plot.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apps.evaluation.primitives import added_norm, distinct_n_share, lm_eval_run, scale_note
from steer import Edit, Intervention, SteeredModel
from steer.chat_template import turn_opening_token
from steer.errors import ConfigError
from train.data import shared_data_dir
from train.features import special_residual_norm, top_anchor_feature

log = logging.getLogger(__name__)

STRENGTHS = (0.0, 15.0, 25.0, 50.0, 100.0, 150.0, 200.0)
# Subjects where small instruct models are above chance; small enough for a CPU (limit items each).
MMLU_SUBJECTS = ("high_school_geography", "high_school_psychology", "marketing", "us_foreign_policy")
PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
)


@dataclass
class SweepConfig:
    """What the sweep measures; `sae_dir` is the FAST SAE whose top turn-opening-token feature is steered."""

    sae_dir: Path
    out: Path
    strengths: tuple[float, ...] = STRENGTHS
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 48
    mmlu_subjects: tuple[str, ...] = MMLU_SUBJECTS
    mmlu_limit: int | None = 25  # items per subject; None = all
    eval_data: Path = field(default_factory=lambda: shared_data_dir("eval"))  # local MMLU files
    batch_size: int = 8
    feature: int | None = None  # None = the top feature of the turn-opening token (<|im_start|> in ChatML)

    def __post_init__(self) -> None:
        self.sae_dir, self.out, self.eval_data = Path(self.sae_dir), Path(self.out), Path(self.eval_data)
        if not self.strengths or any(s < 0 for s in self.strengths):
            raise ConfigError(
                f"strengths must be a non-empty list of non-negative numbers, got {list(self.strengths)}"
            )
        if not self.prompts:
            raise ConfigError("the sweep needs at least one prompt")
        if self.mmlu_limit is not None and self.mmlu_limit < 1:
            raise ConfigError(f"mmlu_limit must be positive or None, got {self.mmlu_limit}")


@dataclass
class StrengthResult:
    strength: float
    alpha: float  # the absolute norm added to the residual
    mmlu_acc: float | None
    mmlu_stderr: float | None
    mmlu_items: int
    replies: list[str]
    distinct_3gram_share: float  # over all replies: share of word 3-grams that are distinct (1 = no repeats)
    mean_reply_words: float


@dataclass
class SweepResult:
    model: str
    layer: int
    sae_dir: str
    feature: int
    feature_mean_max_activation: float | None
    residual_norm_median: float
    scaling: str
    prompts: list[str]
    mmlu_tasks: list[str]
    anchor_token: str | None = None  # the turn-opening token the feature was chosen on; None: --feature
    rows: list[StrengthResult] = field(default_factory=list)
    wall_s: float = 0.0


def mmlu_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: Intervention | None,
    tasks: list[str],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
) -> tuple[float, float, int]:
    """(accuracy, stderr, items) over `tasks` (0-shot, chat template applied) with `spec` active."""
    out = lm_eval_run(model, tokenizer, spec, tasks, task_manager, batch_size, limit=limit)
    correct = n = 0.0
    for task in tasks:
        res = out["results"][task]
        items = out["n-samples"][task]["effective"]
        correct += res["acc,none"] * items
        n += items
    acc = correct / n
    stderr = (acc * (1 - acc) / max(n - 1, 1)) ** 0.5
    return acc, stderr, int(n)


def run_sweep(
    cfg: SweepConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    model_ref: str = "default",
    progress: bool = True,
) -> SweepResult:
    """The whole sweep; writes `sweep.json`, `sweep.md` and `sweep.png` into `cfg.out`."""
    from apps.evaluation.lm_eval.tasks import local_task_manager
    from hub.sae_io import load_sae, sae_layer

    start = time.perf_counter()
    sae = load_sae(cfg.sae_dir, device=model.device)
    layer = sae_layer(sae)
    if layer is None:
        raise ConfigError(f"{cfg.sae_dir}: the SAE metadata names no residual-stream layer (hook_name)")
    anchor = None
    if cfg.feature is None:
        anchor = turn_opening_token(tokenizer)
        feature, activation = top_anchor_feature(model, tokenizer, sae, layer, conversations, progress)
    else:
        feature, activation = cfg.feature, None
    norm = special_residual_norm(model, tokenizer, layer, conversations)
    result = SweepResult(
        model=model_ref,
        layer=layer,
        sae_dir=str(cfg.sae_dir),
        feature=feature,
        feature_mean_max_activation=activation,
        residual_norm_median=norm,
        scaling=f"{scale_note(norm, layer, len(conversations))} (feature {feature}), at special positions",
        prompts=list(cfg.prompts),
        mmlu_tasks=[f"mmlu_local_{s}" for s in cfg.mmlu_subjects],
        anchor_token=anchor,
    )
    sm = SteeredModel(model, tokenizer)
    with local_task_manager(cfg.eval_data, result.mmlu_tasks, " (MMLU subjects)") as task_manager:
        for strength in cfg.strengths:
            alpha = added_norm(strength, norm)
            spec = (
                Intervention(layer=layer, sae=sae, edits=[Edit(feature, "add", alpha)]) if strength else None
            )
            replies = [sm.chat(p, spec=spec, max_new_tokens=cfg.max_new_tokens) for p in cfg.prompts]
            acc, stderr, items = mmlu_score(
                model, tokenizer, spec, result.mmlu_tasks, task_manager, cfg.mmlu_limit, cfg.batch_size
            )
            result.rows.append(
                StrengthResult(
                    strength=strength,
                    alpha=alpha,
                    mmlu_acc=acc,
                    mmlu_stderr=stderr,
                    mmlu_items=items,
                    replies=replies,
                    distinct_3gram_share=distinct_n_share(replies, 3),
                    mean_reply_words=statistics.fmean(len(r.split()) for r in replies),
                )
            )
            log.info("strength %g (alpha %.1f): MMLU %.3f", strength, alpha, acc)
    result.wall_s = time.perf_counter() - start
    write_sweep(result, cfg.out)
    return result


def write_sweep(result: SweepResult, out: Path) -> dict[str, Path]:
    """`sweep.json`, `sweep.md` (table + replies) and `sweep.png` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md", "plot": out / "sweep.png"}
    paths["json"].write_text(
        json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(sweep_markdown(result), encoding="utf-8")
    plot_sweep(result, paths["plot"])
    return paths


def sweep_markdown(result: SweepResult) -> str:
    chosen = f"top `{result.anchor_token}` feature" if result.anchor_token else "given"
    lines = [
        f"# Steering sweep: feature {result.feature} ({chosen}), op `add`, special positions\n",
        f"- model `{result.model}`, layer {result.layer}, SAE `{result.sae_dir}`",
        f"- scaling: {result.scaling}",
        f"- MMLU: {', '.join(result.mmlu_tasks)} (0-shot, chat template applied)",
        f"- wall time {result.wall_s:.0f} s\n",
        "| strength s | added norm | MMLU acc | ± stderr | items | distinct 3-grams | mean reply words |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.strength:g} | {r.alpha:.1f} | {r.mmlu_acc:.4f} | {r.mmlu_stderr:.4f} | {r.mmlu_items} "
            f"| {r.distinct_3gram_share:.3f} | {r.mean_reply_words:.1f} |"
        )
    lines.append("\n## Greedy replies\n")
    for i, prompt in enumerate(result.prompts):
        lines.append(f"### {prompt}\n")
        lines += [f"- **s={r.strength:g}**: {_one_line(r.replies[i])}" for r in result.rows]
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return text.replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)"


def plot_sweep(result: SweepResult, path: Path) -> None:
    """MMLU accuracy (with stderr) and distinct-3-gram share of replies against strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.strength for r in result.rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.errorbar(
        xs,
        [r.mmlu_acc for r in result.rows],
        yerr=[r.mmlu_stderr for r in result.rows],
        marker="o",
        capsize=3,
    )
    ax1.axhline(0.25, color="grey", linestyle=":", linewidth=1, label="chance")
    ax1.set_xlabel("strength s (% of median special-token residual norm)")
    ax1.set_ylabel("MMLU accuracy")
    ax1.legend(fontsize=8)
    ax2.plot(xs, [r.distinct_3gram_share for r in result.rows], marker="o", color="tab:orange")
    ax2.set_xlabel("strength s")
    ax2.set_ylabel("distinct word 3-grams in replies")
    ax2.set_ylim(0, 1.05)
    fig.suptitle(
        f"{result.model} layer {result.layer}: add feature {result.feature} at special tokens", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
