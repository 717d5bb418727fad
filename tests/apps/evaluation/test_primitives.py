"""The steering experiments' shared primitives: the strength scale and distinct-n."""

from __future__ import annotations

import pytest

from apps.evaluation.primitives import added_norm, distinct_n_share, scale_note, strength_of
from steer.errors import ConfigError


def test_distinct_n_share_counts_word_ngrams_over_all_texts():
    assert distinct_n_share(["a b c a b c"], 3) == pytest.approx(3 / 4)
    assert distinct_n_share(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n_share(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n_share(["hi"], 3) == 1.0  # no 3-grams at all
    with pytest.raises(ConfigError, match="n >= 1"):
        distinct_n_share(["a"], 0)


def test_strength_scale_converts_both_ways():
    assert added_norm(100.0, 194.0) == pytest.approx(194.0)  # s = 100 adds R
    assert added_norm(15.0, 200.0) == pytest.approx(30.0)
    assert strength_of(added_norm(37.5, 12.3), 12.3) == pytest.approx(37.5)
    with pytest.raises(ConfigError, match="positive residual norm"):
        strength_of(1.0, 0.0)
    note = scale_note(194.34, 15, 100)
    assert "s/100 x 194.34" in note and "layer 15" in note and "position 0 left out" in note
