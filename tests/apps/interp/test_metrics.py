"""The interpretability metrics against hand-worked and published values."""

from __future__ import annotations

import pytest

from apps.interp import metrics


def test_wilson_interval_matches_the_formula():
    half = metrics.wilson(5, 10)
    assert half["value"] == 0.5
    assert half["ci_low"] == pytest.approx(0.2366, abs=1e-4) and half["ci_high"] == pytest.approx(
        0.7634, abs=1e-4
    )
    none = metrics.wilson(0, 10)
    assert none["ci_low"] == 0 and none["ci_high"] == pytest.approx(0.2775, abs=1e-4)
    assert metrics.wilson(0, 0) == {"value": None, "ci_low": None, "ci_high": None}
    with pytest.raises(ValueError, match="0..n"):
        metrics.wilson(11, 10)


def test_rubric_shares_leave_missing_scores_out():
    scores = [5, 4, 3, 1, None, None]
    assert metrics.histogram(scores) == {"1": 1, "2": 0, "3": 1, "4": 1, "5": 1}
    assert metrics.share_4_5(scores)["value"] == 0.5
    assert metrics.cdf_3(scores)["value"] == 0.5
    with pytest.raises(ValueError, match="1..5"):
        metrics.histogram([6])


def test_balanced_accuracy():
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    assert metrics.balanced_accuracy(labels, [1] * 8) == 0.5  # constant: exactly chance
    assert metrics.balanced_accuracy(labels, [0] * 8) == 0.5
    assert metrics.balanced_accuracy(labels, labels) == 1.0
    assert metrics.balanced_accuracy(labels, [1, 0, 0, 0, 0, 0, 0, 1]) == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert (
        metrics.balanced_accuracy(labels, [1, 1, 1, None, None, None, None, None]) is None
    )  # no negative answered
    assert metrics.balanced_accuracy(labels, [1, None, 0, 0, None, 1, 0, 0]) == pytest.approx(
        (1 / 2 + 3 / 4) / 2
    )


def test_auroc():
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert metrics.auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert metrics.auroc([1, 0], [0.5, 0.5]) == 0.5
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.3, 0.5, 0.1]) == 0.75
    assert metrics.auroc([1, 1], [0.9, 0.3]) is None


def test_distribution():
    d = metrics.distribution([0.5, 0.9, 0.8, None, 0.6])
    assert d["median"] == pytest.approx(0.7) and d["n"] == 4
    assert d["iqr"] == [pytest.approx(0.575), pytest.approx(0.825)]
    assert d["share_ge_0_8"] == 0.5
    assert metrics.distribution([None])["median"] is None


def test_krippendorff_alpha_reproduces_krippendorffs_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, missing values.
    n = None
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    assert metrics.krippendorff_alpha(data, "nominal") == pytest.approx(0.743, abs=1e-3)
    assert metrics.krippendorff_alpha(data, "ordinal") == pytest.approx(0.815, abs=1e-3)
    assert metrics.krippendorff_alpha(data, "interval") == pytest.approx(0.849, abs=1e-3)
    assert metrics.krippendorff_alpha([[1, 2, 3], [1, 2, 3]]) == 1.0
    assert metrics.krippendorff_alpha([[4, 4, 4], [4, 4, 4]]) is None  # no variation: undefined


def test_unpaired_difference():
    interval = metrics.unpaired_difference([1.0] * 20 + [0.0] * 20, [0.0] * 40)
    assert interval.estimate == 0.5 and interval.low > 0.3 and interval.high < 0.7
    same = metrics.unpaired_difference([1.0, 0.0] * 20, [0.0, 1.0] * 20)
    assert same.estimate == 0 and same.low < 0 < same.high
