"""Protocols `detection` and `fuzzing`: does an explanation predict where its feature fires, on held-out text?

- Explanation: the judge describes the feature from 20 training windows (the 10 top ones, and one from each
  activation decile), active tokens `<<marked>>` with their activations.
- Test set, disjoint from training by conversation: 20 positives (2 per decile, as far as the deciles have
  them) and 20 negatives (10 random chat windows, 10 hard ones where the feature is 0: half on its top peak
  tokens, half on the decoder-nearest feature's strongest activations, then special tokens; from the collection).
- Detection shows a test window as plain text: is the feature active in it? Fuzzing shows it with tokens marked
  (a positive's firing tokens; as many random tokens of a negative as positives have on average): are they
  marked correctly? One window per call, so log-probs give P(1) and AUROC.
- Per feature: balanced accuracy over the answered items (chance 0.5, a constant answer exactly 0.5), AUROC
  where log-probs exist; missing answers are left out and counted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apps.interp import metrics
from apps.interp.judge import Judge, JudgeRequest
from apps.interp.prompts import (
    binary_position,
    classify_messages,
    crop,
    digit_probabilities,
    explain_messages,
    marked_text,
    parse_binary,
    parse_explanation,
    plain_text,
)
from steer.errors import ConfigError
from train.interp.examples import FeatureExamples, Window

SCORERS = ("detection", "fuzzing")
TRAIN_TOP = 10  # top windows shown to the explainer
TRAIN_PER_DECILE = 1  # decile windows shown to the explainer (10 deciles)
TEST_PER_DECILE = 2  # positives per decile in the test set
RANDOM_NEGATIVES = 10
HARD_NEGATIVES = 10
RADIUS = 16  # tokens each side of a window's peak
EXPLAIN_TOKENS = 96
CLASSIFY_TOKENS = 8


@dataclass(frozen=True)
class TestItem:
    """One test window: `label` 1 = the feature fires in it; `kind` positive / random / hard."""

    window: Window
    label: int
    kind: str
    decile: int | None = None


@dataclass(frozen=True)
class Split:
    """The explainer's windows and the disjoint test set of one feature."""

    feature: int
    train: tuple[Window, ...]
    test: tuple[TestItem, ...]


@dataclass(frozen=True)
class Explanation:
    feature: int
    text: str | None  # None: the explainer's answer had no [[...]] (missing)
    cache_id: str | None


@dataclass
class Classification:
    """One feature's answers under one scorer."""

    feature: int
    scorer: str
    labels: list[int] = field(default_factory=list)
    predictions: list[int | None] = field(default_factory=list)
    p_one: list[float | None] = field(default_factory=list)
    cache_ids: list[str] = field(default_factory=list)

    @property
    def balanced_accuracy(self) -> float | None:
        return metrics.balanced_accuracy(self.labels, self.predictions)

    @property
    def auroc(self) -> float | None:
        return metrics.auroc(self.labels, self.p_one) if all(p is not None for p in self.p_one) else None

    @property
    def n_missing(self) -> int:
        return sum(p is None for p in self.predictions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "balanced_accuracy": self.balanced_accuracy,
            "auroc": self.auroc,
            "n_items": len(self.labels),
            "n_missing": self.n_missing,
            "cache_ids": self.cache_ids,
        }


def split(
    feature: FeatureExamples,
    negatives: Sequence[Window],
    hard_negatives: Sequence[Window],
    seed: int,
    radius: int = RADIUS,
) -> Split:
    """Training windows and a test set that shares no conversation with them (see the module docstring)."""
    rng = random.Random(f"{seed}:{feature.feature}")
    train = list(feature.top[:TRAIN_TOP])
    used = {w.conversation for w in train}
    pools = [
        [w for w in rng.sample(decile, len(decile)) if w.conversation not in used]
        for decile in feature.deciles
    ]
    for pool in pools:
        for w in pool[:TRAIN_PER_DECILE]:
            train.append(w)
            used.add(w.conversation)
    test = []
    for q, pool in enumerate(pools):
        fresh = [w for w in pool if w.conversation not in used]
        test += [TestItem(crop(w, radius), 1, "positive", q) for w in fresh[:TEST_PER_DECILE]]
    for kind, windows, k in (
        ("random", negatives, RANDOM_NEGATIVES),
        ("hard", hard_negatives, HARD_NEGATIVES),
    ):
        silent = [w for w in windows if w.max_activation == 0]  # a negative is checked, never assumed
        test += [TestItem(crop(w, radius), 0, kind) for w in rng.sample(silent, min(k, len(silent)))]
    rng.shuffle(test)
    return Split(feature.feature, tuple(crop(w, radius) for w in train), tuple(test))


async def explain(judge: Judge, splits: Sequence[Split]) -> dict[int, Explanation]:
    """The judge's explanation of each feature from its training windows."""
    requests = [JudgeRequest(explain_messages(list(s.train)), max_tokens=EXPLAIN_TOKENS) for s in splits]
    replies = await judge.ask_many(requests)
    return {
        s.feature: Explanation(s.feature, parse_explanation(r.text), r.cache_id)
        for s, r in zip(splits, replies, strict=True)
    }


def fuzz_marks(items: Sequence[TestItem], seed: int) -> list[set[int]]:
    """Marked tokens per item: a positive's firing tokens; on a negative, as many random tokens as the
    positives have on average (at least one)."""
    firing = [{i for i, a in enumerate(t.window.activations) if a > 0} for t in items]
    positives = [len(m) for m, t in zip(firing, items, strict=True) if t.label == 1]
    k = max(1, round(sum(positives) / len(positives))) if positives else 1
    rng = random.Random(seed)
    return [
        m if t.label == 1 else set(rng.sample(range(len(t.window.tokens)), min(k, len(t.window.tokens))))
        for m, t in zip(firing, items, strict=True)
    ]


async def classify(
    judge: Judge, scorer: str, splits: Sequence[Split], explanations: dict[int, str], seed: int
) -> list[Classification]:
    """Each feature's test set judged under `scorer` with `explanations[feature]` (features without an
    explanation are left out)."""
    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    jobs: list[tuple[Classification, TestItem]] = []
    requests = []
    out = []
    for s in splits:
        if explanations.get(s.feature) is None:
            continue
        result = Classification(s.feature, scorer)
        out.append(result)
        marks = fuzz_marks(s.test, seed + s.feature) if scorer == "fuzzing" else [set()] * len(s.test)
        for item, marked in zip(s.test, marks, strict=True):
            text = marked_text(item.window, marked) if scorer == "fuzzing" else plain_text(item.window)
            requests.append(
                JudgeRequest(
                    classify_messages(explanations[s.feature], text, scorer == "fuzzing"),
                    max_tokens=CLASSIFY_TOKENS,
                )
            )
            jobs.append((result, item))
    replies = await judge.ask_many(requests)
    for (result, item), reply in zip(jobs, replies, strict=True):
        position = binary_position(reply.text)
        probs = digit_probabilities(reply, position, "01") if position is not None else None
        result.labels.append(item.label)
        result.predictions.append(parse_binary(reply.text))
        result.p_one.append(probs.get(1, 0.0) if probs else None)
        result.cache_ids.append(reply.cache_id)
    return out


def summarise(results: Sequence[Classification]) -> dict[str, Any]:
    """Median, IQR and share >= 0.8 of balanced accuracy over features; the AUROC median (None without
    log-probs); answered and missing counts."""
    accuracy = metrics.distribution([r.balanced_accuracy for r in results])
    aurocs = [r.auroc for r in results if r.auroc is not None]
    n_items = sum(len(r.labels) for r in results)
    n_missing = sum(r.n_missing for r in results)
    return {
        "balanced_accuracy_median": accuracy["median"],
        "iqr": accuracy["iqr"],
        "share_ge_0_8": accuracy["share_ge_0_8"],
        "auroc_median": metrics.distribution(aurocs)["median"],
        "n_features": accuracy["n"],
        "n_items": n_items,
        "n_parse_failures": n_missing,
        "parse_failure_rate": n_missing / n_items if n_items else None,
    }
