"""The steering evaluation: does adding a feature at special positions help IFEval, and does FAST's help more?

Conditions (all greedy, chat template applied):
- `plain`: the model as it is;
- `prompt`: a system prompt asking for careful, complete instruction following (`SYSTEM_PROMPT`);
- `fast`, `btf`: the top feature of the turn-opening token (`<|im_start|>` in ChatML; App. F selection) of the
  FAST / BT(F) SAE, op `add` at special positions, at strengths in % of the median special-position residual
  norm (as the sweep);
- `random`: a seeded random unit direction, stored as a one-feature SAE folder (`random_direction/`),
  steered with the same op, strengths and positions: any push at special tokens, not a feature.

Protocol: IFEval is split into disjoint seeded dev / test sets; each steering method's strength is the one
with the best dev prompt-level strict accuracy (ties: the smaller strength), and only that strength (plus
the largest, to see whether the effect turns over) is run on test. ARC-Easy (log-likelihood accuracy) is
the capability check at each method's chosen strength. Every difference from `plain` has a paired
bootstrap CI over the same items. Each (condition, strength, split) cell is cached in `cells/` and reused
while its settings are unchanged, dtype, device, batch size and library versions included (`run_key`).
"""

from apps.evaluation.steer_eval.cells import folder_digest, random_direction_sae, run_key
from apps.evaluation.steer_eval.config import (
    STRENGTHS,
    SYSTEM_PROMPT,
    SteerEvalConfig,
    choose_strength,
    split_items,
)
from apps.evaluation.steer_eval.protocol import run_steer_eval
from apps.evaluation.steer_eval.replies import reply_stats
from apps.evaluation.steer_eval.report import report_markdown, write_report

__all__ = [
    "STRENGTHS",
    "SYSTEM_PROMPT",
    "SteerEvalConfig",
    "choose_strength",
    "folder_digest",
    "random_direction_sae",
    "reply_stats",
    "report_markdown",
    "run_key",
    "run_steer_eval",
    "split_items",
    "write_report",
]
