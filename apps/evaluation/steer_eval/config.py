"""The steering evaluation's settings, conditions, cells, split and strength choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apps.evaluation.lm_eval.tasks import IFEVAL_FILES
from apps.evaluation.stats import RESAMPLES
from hub.formats import CFG_FILE
from steer import Edit, Intervention
from steer.errors import ConfigError, MissingFileError
from steer.sae import SAE
from train.data import shared_data_dir

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
    eval_data: Path = field(default_factory=lambda: shared_data_dir("eval"))
    batch_size: int = 8
    seed: int = 0  # split, random direction and bootstrap seeds derive from it
    resamples: int = RESAMPLES

    def __post_init__(self) -> None:
        self.fast_sae, self.btf_sae = Path(self.fast_sae), Path(self.btf_sae)
        self.out, self.eval_data = Path(self.out), Path(self.eval_data)
        for name, folder in (("FAST", self.fast_sae), ("BT(F)", self.btf_sae)):
            if not (folder / CFG_FILE).is_file():
                raise MissingFileError(
                    f"{name} SAE folder {folder} has no {CFG_FILE} (expected an SAE folder)"
                )
        if (
            not self.strengths
            or any(s <= 0 for s in self.strengths)
            or len(set(self.strengths)) != len(self.strengths)
        ):
            raise ConfigError(
                f"strengths must be distinct positive numbers (plain is its own condition), got {list(self.strengths)}"
            )
        self.strengths = tuple(sorted(self.strengths))
        for name in ("dev", "test", "arc", "max_new_tokens", "batch_size", "resamples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.eval_data / IFEVAL_FILES[0]).is_file():
            raise MissingFileError(f"no {IFEVAL_FILES[0]} in {self.eval_data}")


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
    """Disjoint dev and test document indices drawn from `range(n_items)` by a seeded permutation: test
    first, so that the test set depends only on (`seed`, `n_test`) and a larger dev split keeps it."""
    if n_dev + n_test > n_items:
        raise ConfigError(
            f"dev {n_dev} + test {n_test} prompts exceed the {n_items} IFEval prompts available"
        )
    order = np.random.default_rng(seed).permutation(n_items)
    return sorted(int(i) for i in order[n_test : n_test + n_dev]), sorted(int(i) for i in order[:n_test])


def choose_strength(scores: dict[float, float]) -> float:
    """The strength with the best score; ties go to the smaller strength."""
    if not scores:
        raise ConfigError("no strengths to choose from")
    return min(scores, key=lambda s: (-scores[s], s))
