"""Protocol `fast-paper`: the FAST paper's monosemanticity rubric (§5, App. E), in our own wording.

Per feature the judge sees its top-5 distinct windows (±`radius` tokens around each maximum, as
`token<TAB>activation` lines) and answers a 1-5 score, then a short name (`reason_first` asks for reasoning
before them, an ablation). Only features whose five top activations are all > 0 are eligible, and `features`
of them are sampled at random with a saved seed. Where the judge gives log-probs, the expected score
E[s] = sum p(d) d over the digits at the score's position is kept beside the answered score.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from apps.interp import metrics
from apps.interp.judge import Judge, JudgeRequest
from apps.interp.prompts import crop, digit_probabilities, parse_rubric, rubric_messages, rubric_position
from steer.errors import ConfigError
from train.interp.examples import FeatureExamples, Window

TOP_K = 5  # windows shown per feature
RADIUS = 32  # tokens each side of a window's maximum
FEATURES = 128  # features sampled per SAE
SCORE_TOKENS = 48  # answer budget, score first
REASON_TOKENS = 384  # answer budget with reasoning first


@dataclass(frozen=True)
class RubricItem:
    """What one rubric call shows: `key` names it (`feature:12`, `chimera:3`), `windows` are cropped."""

    key: str
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class RubricScore:
    key: str
    score: int | None  # None: the answer had no [[1-5]] (missing, not low)
    name: str | None
    expected_score: float | None  # from log-probs, where the judge gives them
    cache_id: str
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "name": self.name,
            "expected_score": self.expected_score,
            "cache_id": self.cache_id,
            "error": self.error,
        }


def eligible(feature: FeatureExamples) -> bool:
    """At least TOP_K top windows, all with a maximum > 0 (the paper keeps only such features)."""
    return len(feature.top) >= TOP_K and all(w.max_activation > 0 for w in feature.top[:TOP_K])


def sample_features(
    live: Sequence[int], load: Callable[[int], FeatureExamples], k: int, seed: int
) -> list[FeatureExamples]:
    """`k` eligible features drawn uniformly at random with `seed` from the `live` ones, in feature order.

    The live features are visited in a seeded random order and loaded (`load`) until `k` are eligible, so
    only as many are read as the sample needs."""
    if k < 1:
        raise ConfigError(f"--features must be at least 1, got {k}")
    if k > len(live):
        raise ConfigError(
            f"--features {k} is more than the {len(live)} live features; ask for at most {len(live)}"
        )
    order = sorted(live)
    random.Random(seed).shuffle(order)
    chosen: list[FeatureExamples] = []
    for index in order:
        feature = load(index)
        if eligible(feature):
            chosen.append(feature)
            if len(chosen) == k:
                return sorted(chosen, key=lambda f: f.feature)
    raise ConfigError(
        f"--features {k} is more than the {len(chosen)} live features with {TOP_K} top windows all above 0 "
        f"(of {len(live)} live features); ask for at most {len(chosen)}"
    )


def rubric_item(feature: FeatureExamples, radius: int = RADIUS) -> RubricItem:
    return RubricItem(f"feature:{feature.feature}", tuple(crop(w, radius) for w in feature.top[:TOP_K]))


def rubric_request(item: RubricItem, reason_first: bool, seed: int | None = None) -> JudgeRequest:
    return JudgeRequest(
        rubric_messages(list(item.windows), reason_first),
        seed=seed,
        max_tokens=REASON_TOKENS if reason_first else SCORE_TOKENS,
    )


async def score_items(
    judge: Judge, items: Sequence[RubricItem], reason_first: bool = False, seed: int | None = None
) -> list[RubricScore]:
    """The judge's rubric score of each item, in order (`seed` overrides the judge's)."""
    replies = await judge.ask_many([rubric_request(item, reason_first, seed) for item in items])
    out = []
    for item, reply in zip(items, replies, strict=True):
        score, name = parse_rubric(reply.text, reason_first)
        position = rubric_position(reply.text, reason_first)
        probs = digit_probabilities(reply, position, "12345") if position is not None else None
        expected = sum(d * p for d, p in probs.items()) if probs else None
        out.append(RubricScore(item.key, score, name, expected, reply.cache_id, reply.error))
    return out


def summarise(scores: Sequence[RubricScore]) -> dict[str, Any]:
    """Histogram, share 4-5 and CDF at 3 (Wilson 95 % CIs), mean, expected mean, parse failures."""
    given = [s.score for s in scores]
    answered = [s.score for s in scores if s.score is not None]
    expected = [s.expected_score for s in scores if s.expected_score is not None]
    return {
        "histogram": metrics.histogram(given),
        "share_4_5": metrics.share_4_5(given),
        "cdf_3": metrics.cdf_3(given),
        "mean": sum(answered) / len(answered) if answered else None,
        "expected_score_mean": sum(expected) / len(expected) if expected else None,
        "n_scored": len(answered),
        "n_parse_failures": len(scores) - len(answered),
        "parse_failure_rate": (len(scores) - len(answered)) / len(scores) if scores else None,
    }
