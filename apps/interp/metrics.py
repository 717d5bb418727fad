"""The numbers interpretability is reported in: Wilson intervals for shares of the 1-5 rubric, balanced accuracy
and AUROC of a classifier judge, the median / IQR / share >= 0.8 over features, Krippendorff's alpha for
test-retest, and bootstrap intervals on differences (paired ones come from `apps.evaluation.stats`).

Missing answers (None) are left out of every statistic, never counted as wrong; each function says how many
values it used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from apps.evaluation.stats import LEVEL, RESAMPLES, Interval
from steer.errors import ConfigError

Z_95 = 1.959963984540054
SCORES = (1, 2, 3, 4, 5)
HIGH_ACCURACY = 0.8  # a feature "is detected" at balanced accuracy >= this
PROXY_FIELDS = ("density", "top_token_share", "top_token_entropy", "special_share", "nearest_cosine")


def wilson(successes: int, n: int, z: float = Z_95) -> dict[str, float | None]:
    """`{value, ci_low, ci_high}`: the share `successes / n` with its Wilson score interval (None when n = 0)."""
    if not 0 <= successes <= n:
        raise ConfigError(f"successes must lie in 0..n, got {successes} of {n}")
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"value": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half)}


def histogram(scores: Sequence[int | None]) -> dict[str, int]:
    """Counts of each rubric score 1..5 (missing scores left out)."""
    given = [s for s in scores if s is not None]
    if any(s not in SCORES for s in given):
        raise ConfigError(f"rubric scores must be 1..5, got {sorted(set(given) - set(SCORES))}")
    return {str(s): given.count(s) for s in SCORES}


def share_4_5(scores: Sequence[int | None]) -> dict[str, float | None]:
    """Share of the scored features with a score of 4 or 5 (the paper's "highest quality range")."""
    given = [s for s in scores if s is not None]
    return wilson(sum(s >= 4 for s in given), len(given))


def cdf_3(scores: Sequence[int | None]) -> dict[str, float | None]:
    """P(score <= 3) over the scored features (the paper's CDF at 3)."""
    given = [s for s in scores if s is not None]
    return wilson(sum(s <= 3 for s in given), len(given))


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int | None]) -> float | None:
    """(true-positive rate + true-negative rate) / 2 over the answered items; None unless both classes
    have an answered item. A constant answer gives exactly 0.5."""
    pairs = [(y, p) for y, p in zip(labels, predictions, strict=True) if p is not None]
    pos = [p for y, p in pairs if y == 1]
    neg = [p for y, p in pairs if y == 0]
    if not pos or not neg:
        return None
    return (sum(p == 1 for p in pos) / len(pos) + sum(p == 0 for p in neg) / len(neg)) / 2


def auroc(labels: Sequence[int], scores: Sequence[float | None]) -> float | None:
    """Area under the ROC curve of `scores` (higher = positive) over the scored items, ties counted half;
    None unless both classes have a score."""
    pairs = [(y, s) for y, s in zip(labels, scores, strict=True) if s is not None]
    pos = np.array([s for y, s in pairs if y == 1], dtype=np.float64)
    neg = np.array([s for y, s in pairs if y == 0], dtype=np.float64)
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def distribution(values: Sequence[float | None]) -> dict[str, float | int | list[float] | None]:
    """`{median, iqr: [q1, q3], share_ge_0_8, n}` over the given values (missing ones left out)."""
    given = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(given):
        return {"median": None, "iqr": None, "share_ge_0_8": None, "n": 0}
    q1, median, q3 = np.percentile(given, [25, 50, 75])
    return {
        "median": float(median),
        "iqr": [float(q1), float(q3)],
        "share_ge_0_8": float((given >= HIGH_ACCURACY).mean()),
        "n": int(len(given)),
    }


def proxy_medians(proxies: Sequence[dict[str, Any] | None]) -> dict[str, float | int | None]:
    """The median of each numeric judge-free proxy (`PROXY_FIELDS`) over features, and how many there were."""
    given = [p for p in proxies if p is not None]
    out: dict[str, float | int | None] = {
        name: float(np.median([p[name] for p in given])) if given else None for name in PROXY_FIELDS
    }
    return out | {"n": len(given)}


def krippendorff_alpha(ratings: Sequence[Sequence[float | None]], level: str = "ordinal") -> float | None:
    """Krippendorff's alpha of `ratings[coder][unit]` (None = not rated) at the `nominal`, `ordinal` or
    `interval` level; None when fewer than two pairable values exist or every value is the same."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ConfigError(f"alpha level must be nominal, ordinal or interval, got {level!r}")
    if len({len(r) for r in ratings}) > 1:
        raise ConfigError("every coder must rate the same units (use None for a missing rating)")
    units = [[r[u] for r in ratings if r[u] is not None] for u in range(len(ratings[0]) if ratings else 0)]
    units = [u for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    if len(values) < 2:
        return None
    index = {v: i for i, v in enumerate(values)}
    coincidence = np.zeros((len(values), len(values)))
    for unit in units:
        for i, a in enumerate(unit):
            for j, b in enumerate(unit):
                if i != j:
                    coincidence[index[a], index[b]] += 1 / (len(unit) - 1)
    n_c = coincidence.sum(1)
    n = n_c.sum()
    delta = np.zeros_like(coincidence)
    for c, vc in enumerate(values):
        for k, vk in enumerate(values):
            if level == "nominal":
                delta[c, k] = float(c != k)
            elif level == "interval":
                delta[c, k] = (vc - vk) ** 2
            else:
                lo, hi = min(c, k), max(c, k)
                delta[c, k] = (n_c[lo : hi + 1].sum() - (n_c[c] + n_c[k]) / 2) ** 2
    observed = (coincidence * delta).sum()
    expected = (np.outer(n_c, n_c) * delta).sum() / (n - 1)
    return float(1 - observed / expected)


def unpaired_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Interval:
    """`mean(a) - mean(b)` with a percentile bootstrap CI, each sample resampled on its own (different SAEs
    have different features: nothing is paired)."""
    if not len(a) or not len(b):
        raise ConfigError("the bootstrap of a difference needs at least one value on each side")
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    stats = xa[rng.integers(0, len(xa), (resamples, len(xa)))].mean(1) - xb[
        rng.integers(0, len(xb), (resamples, len(xb)))
    ].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(estimate=float(xa.mean() - xb.mean()), low=float(low), high=float(high))
