"""Controls that decide whether a judge's scores mean anything, run on the same features and cache.

| control | what a valid judge does | check |
|---|---|---|
| shuffled explanations (detection) | balanced accuracy near chance | median <= SHUFFLED_MAX_ACCURACY |
| chimera features (rubric): 5 windows of 5 different features | almost never 4-5 | share 4-5 <= CHIMERA_MAX_SHARE_4_5 |
| activations permuted inside each window (rubric) | scores drop | paired 95 % CI of the mean drop above 0 |
| test-retest: another seed, windows in another order (rubric) | the same scores | Krippendorff's ordinal alpha >= RETEST_MIN_ALPHA |
| constant / random judges through the same HTTP path | exactly 0.5 / about 0.5 | equal / within RANDOM_JUDGE_TOLERANCE |
| parse failures of the real judge | few | rate <= MAX_PARSE_FAILURE_RATE |
| a random-direction SAE at matched L0 (when run) | near chance | median <= RANDOM_SAE_MAX_ACCURACY |

The thresholds are our proposal (../shared/research/autointerp.md §5.3), not published values. A check that
was not run is listed as such and does not fail the verdict; a check whose value is undefined (e.g. alpha of
a judge that always gives the same score) fails.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from apps.evaluation.stats import paired_difference
from apps.interp import detection, fast_paper, metrics
from apps.interp.fake_judge import FakeAnswer, random_digits, serve_fake_judge
from apps.interp.fast_paper import RubricItem, RubricScore
from apps.interp.judge import Judge, JudgeConfig
from apps.interp.prompts import RUBRIC_SYSTEM, crop
from steer.errors import ConfigError
from train.interp.examples import FeatureExamples

SHUFFLED_MAX_ACCURACY = 0.6
CHIMERA_MAX_SHARE_4_5 = 0.10
PERMUTED_MIN_DROP = 0.0  # the lower end of the 95 % CI of the mean score drop must exceed this
RETEST_MIN_ALPHA = 0.67
CONSTANT_JUDGE_ACCURACY = 0.5
RANDOM_JUDGE_TOLERANCE = 0.1
MAX_PARSE_FAILURE_RATE = 0.10
RANDOM_SAE_MAX_ACCURACY = 0.65
THRESHOLDS = {
    "shuffled_explanations": f"median balanced accuracy <= {SHUFFLED_MAX_ACCURACY}",
    "chimera": f"share 4-5 <= {CHIMERA_MAX_SHARE_4_5}",
    "permuted_activations": f"95% CI of the mean score drop > {PERMUTED_MIN_DROP}",
    "test_retest": f"Krippendorff's ordinal alpha >= {RETEST_MIN_ALPHA}",
    "constant_judge": f"balanced accuracy == {CONSTANT_JUDGE_ACCURACY} on every feature; share 4-5 == 1 for [[4]]",
    "random_judge": f"|median balanced accuracy - 0.5| <= {RANDOM_JUDGE_TOLERANCE}",
    "parse_failures": f"parse-failure rate <= {MAX_PARSE_FAILURE_RATE}",
    "random_sae": f"median balanced accuracy <= {RANDOM_SAE_MAX_ACCURACY}",
}


@dataclass(frozen=True)
class Check:
    """One control's outcome: `passed` None = not run."""

    name: str
    value: Any
    passed: bool | None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"threshold": THRESHOLDS[self.name]}


def shuffled(explanations: dict[int, str | None], seed: int) -> dict[int, str]:
    """Each explanation moved to another feature (a derangement of the features that have one)."""
    features = sorted(f for f, e in explanations.items() if e is not None)
    if len(features) < 2:
        raise ConfigError("the shuffled-explanation control needs at least 2 explained features")
    rng = random.Random(seed)
    rng.shuffle(features)
    order = features[1:] + features[:1]  # a rotation of a shuffled list: a derangement
    return {f: explanations[g] for f, g in zip(features, order, strict=True)}


def chimeras(features: Sequence[FeatureExamples], n: int, seed: int) -> list[RubricItem]:
    """`n` rubric items, each one top window from each of TOP_K different features."""
    if len(features) < fast_paper.TOP_K:
        raise ConfigError(f"chimera features need at least {fast_paper.TOP_K} features, got {len(features)}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        parts = rng.sample(list(features), fast_paper.TOP_K)
        windows = tuple(crop(rng.choice(f.top[: fast_paper.TOP_K]), fast_paper.RADIUS) for f in parts)
        items.append(RubricItem(f"chimera:{i}", windows))
    return items


def permuted(items: Sequence[RubricItem], seed: int) -> list[RubricItem]:
    """The same windows with each window's activations shuffled over its tokens."""
    rng = random.Random(seed)

    def shuffle(values: tuple[float, ...]) -> tuple[float, ...]:
        out = list(values)
        rng.shuffle(out)
        return tuple(out)

    return [
        RubricItem(
            f"permuted:{it.key}", tuple(replace(w, activations=shuffle(w.activations)) for w in it.windows)
        )
        for it in items
    ]


def reordered(items: Sequence[RubricItem], seed: int) -> list[RubricItem]:
    """The same windows in another order (test-retest)."""
    rng = random.Random(seed)
    return [RubricItem(it.key, tuple(rng.sample(it.windows, len(it.windows)))) for it in items]


def score_drop(real: Sequence[RubricScore], permuted_scores: Sequence[RubricScore]) -> dict[str, Any]:
    """Mean score drop real - permuted over features answered both times, with a paired bootstrap CI."""
    pairs = [
        (a.score, b.score)
        for a, b in zip(real, permuted_scores, strict=True)
        if None not in (a.score, b.score)
    ]
    if not pairs:
        return {"estimate": None, "low": None, "high": None, "n": 0}
    interval = paired_difference([(a - 1, 4) for a, _ in pairs], [(b - 1, 4) for _, b in pairs])
    return {
        "estimate": 4 * interval.estimate,
        "low": 4 * interval.low,
        "high": 4 * interval.high,
        "n": len(pairs),
    }


async def fake_judges(
    config: JudgeConfig,
    splits: Sequence[detection.Split],
    explanations: dict[int, str],
    items: Sequence[RubricItem],
    seed: int,
) -> dict[str, Any]:
    """Constant and random judges on 127.0.0.1, asked through the same client as the real one."""
    out: dict[str, Any] = {}
    for name, respond in (("constant", _constant), ("random", random_digits("01", seed))):
        with serve_fake_judge(respond) as server:
            fake = Judge(
                replace(config, url=server.url, model=f"{name}-judge", cache_dir=config.cache_dir / "fake")
            )
            results = (
                await detection.classify(fake, "detection", splits, explanations, seed) if splits else []
            )
            rubric = await fast_paper.score_items(fake, items) if name == "constant" and items else []
        out[name] = {
            "balanced_accuracy": [r.balanced_accuracy for r in results],
            "share_4_5": metrics.share_4_5([s.score for s in rubric])["value"] if rubric else None,
        }
    return out


def _constant(body: dict[str, Any]) -> FakeAnswer:
    """`[[4]]` to the rubric, `[[1]]` to everything else."""
    rubric = body["messages"][0]["content"] == RUBRIC_SYSTEM
    return FakeAnswer("[[4]] [[constant]]" if rubric else "[[1]]")


def checks(
    *,
    shuffled_summary: dict[str, Any] | None = None,
    chimera_summary: dict[str, Any] | None = None,
    drop: dict[str, Any] | None = None,
    alpha: float | None | str = "not run",
    fakes: dict[str, Any] | None = None,
    parse_failure_rate: float | None = None,
    random_sae_summary: dict[str, Any] | None = None,
) -> list[Check]:
    """The checks of every control given (None / "not run": the control did not run)."""
    out = []
    if shuffled_summary is None:
        out.append(Check("shuffled_explanations", None, None, "needs detection"))
    else:
        median = shuffled_summary["balanced_accuracy_median"]
        out.append(
            Check("shuffled_explanations", median, median is not None and median <= SHUFFLED_MAX_ACCURACY)
        )
    if chimera_summary is None:
        out.append(Check("chimera", None, None, "needs fast-paper"))
    else:
        share = chimera_summary["share_4_5"]["value"]
        out.append(Check("chimera", share, share is not None and share <= CHIMERA_MAX_SHARE_4_5))
    if drop is None:
        out.append(Check("permuted_activations", None, None, "needs fast-paper"))
    else:
        low = drop["low"]
        out.append(Check("permuted_activations", drop, low is not None and low > PERMUTED_MIN_DROP))
    if alpha == "not run":
        out.append(Check("test_retest", None, None, "needs fast-paper"))
    else:
        detail = "" if alpha is not None else "undefined: fewer than two distinct scores"
        out.append(Check("test_retest", alpha, alpha is not None and alpha >= RETEST_MIN_ALPHA, detail))
    if fakes is None:
        out.append(Check("constant_judge", None, None, "controls off"))
        out.append(Check("random_judge", None, None, "controls off"))
    else:
        const = fakes["constant"]
        exact = all(b == CONSTANT_JUDGE_ACCURACY for b in const["balanced_accuracy"]) and const[
            "share_4_5"
        ] in (None, 1.0)
        out.append(Check("constant_judge", const, exact))
        accuracies = [b for b in fakes["random"]["balanced_accuracy"] if b is not None]
        median = statistics.median(accuracies) if accuracies else None
        out.append(
            Check(
                "random_judge",
                median,
                None if median is None else abs(median - 0.5) <= RANDOM_JUDGE_TOLERANCE,
            )
        )
    out.append(
        Check(
            "parse_failures",
            parse_failure_rate,
            None if parse_failure_rate is None else parse_failure_rate <= MAX_PARSE_FAILURE_RATE,
        )
    )
    if random_sae_summary is None:
        out.append(Check("random_sae", None, None, "not run: needs --controls and the detection protocol"))
    else:
        median = random_sae_summary["balanced_accuracy_median"]
        out.append(Check("random_sae", median, median is not None and median <= RANDOM_SAE_MAX_ACCURACY))
    return out


def verdict(results: Sequence[Check]) -> dict[str, Any]:
    """`judge validated` when every check that ran passed (and at least one judge check ran), else
    `judge NOT validated: <failed checks>`."""
    failed = [c.name for c in results if c.passed is False]
    judged = [c for c in results if c.passed is not None and c.name not in ("constant_judge", "random_judge")]
    if not judged:
        failed.append("no judge control ran")
    return {
        "judge_validated": not failed,
        "verdict": "judge validated" if not failed else f"judge NOT validated: {', '.join(failed)}",
        "not_run": [c.name for c in results if c.passed is None],
        "checks": [c.as_dict() for c in results],
        "thresholds": THRESHOLDS,
    }
