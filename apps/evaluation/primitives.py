"""Primitives shared by the steering experiments (the sweep and steer-eval): the strength scale, distinct-n
and one lm-eval run through the `fast-steer` model.

Strength scaling: strength `s` adds `s / 100 x R` along the feature's unit decoder direction, where `R` is
the median residual norm at the special-token positions of the SAE's layer on held-out conversations
(position 0 left out: its attention-sink residual is ~100x larger on SmolLM2; see
`train.features.special_residual_norm`). So `s = 100` adds a vector as long as a typical special-token residual.
The paper's strengths {15, 25, 50, 100, 150, 200} were absolute norms on Qwen2.5-7B-Instruct; this relative
scale makes them comparable across models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer import Intervention

REPO_ROOT = Path(__file__).resolve().parents[2]


DEFAULT_EVAL_DATA = REPO_ROOT.parent / "shared" / "data" / "eval"


def added_norm(strength: float, norm: float) -> float:
    """The norm that strength `strength` (in % of the special-position residual norm `norm`) adds."""
    return strength / 100.0 * norm


def distinct_3gram_share(texts: list[str]) -> float:
    """Distinct word 3-grams / all word 3-grams over `texts` (1.0 when there are none)."""
    grams = [
        tuple(words[i : i + 3]) for text in texts for words in [text.split()] for i in range(len(words) - 2)
    ]
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
