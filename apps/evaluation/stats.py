"""Percentile bootstrap over items: an accuracy's CI and the paired CI of a difference of two accuracies.

An item is `(hits, total)`: a prompt-level score is `(0 or 1, 1)`, an instruction-level one
`(instructions followed, instructions)`. A statistic is `sum(hits) / sum(totals)` over the items, so
instruction-level accuracy is resampled by prompt, as the prompts (not the instructions) are the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from steer.errors import ConfigError

RESAMPLES = 2000
LEVEL = 0.95

Items = Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def ratio(items: Items) -> float:
    """`sum(hits) / sum(totals)` over `items`."""
    hits, totals = _arrays(items)
    return float(hits.sum() / totals.sum())


def bootstrap_ratio(
    items: Items, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Interval:
    """`ratio(items)` with a percentile CI from resampling the items with replacement."""
    hits, totals = _arrays(items)
    idx = _indices(len(hits), resamples, seed)
    stats = hits[idx].sum(1) / totals[idx].sum(1)
    return _interval(ratio(items), stats, level)


def paired_difference(
    items: Items, baseline: Items, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Interval:
    """`ratio(items) - ratio(baseline)` with a paired percentile CI: item i of both lists is the same
    prompt, and every resample draws the same item indices from both."""
    if len(items) != len(baseline):
        raise ValueError(f"paired items must line up: {len(items)} against {len(baseline)}")
    hits, totals = _arrays(items)
    base_hits, base_totals = _arrays(baseline)
    idx = _indices(len(hits), resamples, seed)
    stats = hits[idx].sum(1) / totals[idx].sum(1) - base_hits[idx].sum(1) / base_totals[idx].sum(1)
    return _interval(ratio(items) - ratio(baseline), stats, level)


def _arrays(items: Items) -> tuple[np.ndarray, np.ndarray]:
    if not len(items):
        raise ValueError("the bootstrap needs at least one item")
    array = np.asarray(items, dtype=np.float64).reshape(len(items), 2)
    if (array[:, 1] <= 0).any() or (array[:, 0] < 0).any() or (array[:, 0] > array[:, 1]).any():
        raise ValueError("every item must be (hits, total) with 0 <= hits <= total and total > 0")
    return array[:, 0], array[:, 1]


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ConfigError(f"resamples must be positive, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(estimate: float, stats: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(estimate=float(estimate), low=float(low), high=float(high))


def format_interval(interval: Interval | dict) -> str:
    """`+0.012 [-0.030, +0.055]`: an estimate with its CI."""
    i = interval if isinstance(interval, dict) else asdict(interval)
    return f"{i['estimate']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]"
