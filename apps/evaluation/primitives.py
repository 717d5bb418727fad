"""Primitives shared by the steering experiments (the sweep, steer-eval) and the demo: the strength scale,
distinct-n and one lm-eval run through the `fast-steer` model.

Strength scaling (the one scale of the study, the demo and its exported specs): strength `s` adds
`added_norm(s, R) = s / 100 x R` along the feature's unit decoder direction, where `R` is the median residual
norm at the special-token positions of the SAE's layer on held-out conversations (position 0 left out: its
attention-sink residual is ~100x larger on SmolLM2; see `train.features.special_norm_median`). So `s = 100`
adds a vector as long as a typical special-token residual. A spec's `add` strength is the added norm itself.
The paper's strengths {15, 25, 50, 100, 150, 200} were absolute norms on Qwen2.5-7B-Instruct; this relative
scale makes them comparable across models.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer import Intervention
from steer.errors import ConfigError

SCALE_STATISTIC = "median residual norm at special-token positions, position 0 left out"


def added_norm(strength: float, norm: float) -> float:
    """The norm that strength `strength` (in % of the special-position residual norm `norm`) adds."""
    return strength / 100.0 * norm


def strength_of(added: float, norm: float) -> float:
    """The strength (in % of `norm`) that adds the norm `added`: the inverse of `added_norm`."""
    if not norm > 0:
        raise ConfigError(f"the strength scale needs a positive residual norm, got {norm}")
    return added / norm * 100.0


def scale_note(norm: float, layer: int, n_conversations: int) -> str:
    """How a strength becomes an added norm, in words, for results files and exported specs."""
    return (
        f"strength s adds s/100 x {norm:.2f} (the {SCALE_STATISTIC}, of layer {layer} over {n_conversations} "
        "held-out conversations) along the feature's unit decoder direction"
    )


def distinct_n_share(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over `texts` (1.0 when there are none)."""
    if n < 1:
        raise ConfigError(f"n-grams need n >= 1, got {n}")
    grams = [tuple(w[i : i + n]) for text in texts for w in [text.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def lm_eval_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: Intervention | None,
    tasks: list[str],
    task_manager: Any,
    batch_size: int,
    **options: Any,
) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` (0-shot, chat template applied) through the `fast-steer`
    model with `spec` active; `options` go to `simple_evaluate` (`limit`, `samples`, `log_samples`,
    `system_instruction`, `gen_kwargs`...)."""
    from lm_eval import simple_evaluate

    from apps.evaluation.lm_eval.model import FastSteerLM

    lm = FastSteerLM(pretrained=model, tokenizer=tokenizer, spec=spec, batch_size=batch_size)
    settings = {"log_samples": False, "bootstrap_iters": 0, "verbosity": "WARNING", **options}
    return simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=0, task_manager=task_manager, apply_chat_template=True, **settings
    )
