"""The study statistics against hand-computed cases: bootstrap intervals, paired differences, the
learning-rate selection rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memforge.ablate.stats import Interval, best_index, bootstrap_mean, paired_difference, paired_values


def test_interval_matches_a_hand_written_percentile_bootstrap_with_the_same_resamples():
    x = np.array([0.52, 0.57, 0.61, 0.55, 0.49])
    got = bootstrap_mean(x, resamples=2000, seed=7)
    # The same draws scipy makes: one batch of resampled indices from the seeded generator.
    rng = np.random.default_rng(7)
    means = x[rng.integers(0, x.size, (2000, x.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    assert got.n == 5
    assert got.mean == pytest.approx(0.548, abs=1e-12)
    assert got.low == pytest.approx(low, abs=1e-12)
    assert got.high == pytest.approx(high, abs=1e-12)
    assert got.low < got.mean < got.high


def test_two_values_give_exactly_their_range():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: both 2.5% tails lie
    # inside the point masses at 0 and 1, so the 95% interval is exactly [0, 1].
    assert bootstrap_mean([0.0, 1.0]) == Interval(0.5, 0.0, 1.0, 2)


def test_confidence_level_is_used():
    # At 20% the quantiles 0.4 and 0.6 fall inside the point mass at 0.5.
    assert bootstrap_mean([0.0, 1.0], confidence=0.2) == Interval(0.5, 0.5, 0.5, 2)


def test_edge_cases_have_defined_answers():
    assert bootstrap_mean([0.7, 0.7, 0.7]) == Interval(0.7, 0.7, 0.7, 3)  # zero width, not NaN
    one = bootstrap_mean([0.3])
    assert (one.mean, one.n, one.has_interval) == (0.3, 1, False)
    assert math.isnan(one.low) and math.isnan(one.high)
    none = bootstrap_mean([])
    assert none.n == 0 and math.isnan(none.mean) and not none.has_interval


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        bootstrap_mean([0.5, float("nan")])


def test_same_values_same_seed_same_interval():
    x = [0.1, 0.4, 0.35, 0.2]
    assert bootstrap_mean(x) == bootstrap_mean(list(x))
    # With few resamples the seed shows; with the default 10,000 the quantiles of 4 values do not move.
    y = [0.11, 0.42, 0.35, 0.2, 0.93, 0.57]
    assert bootstrap_mean(y, resamples=100, seed=1) != bootstrap_mean(y, resamples=100, seed=2)


def test_paired_difference_uses_only_shared_seeds():
    variant = {0: 0.6, 1: 0.7, 2: 0.65, 3: 0.9}
    baseline = {0: 0.5, 1: 0.6, 2: 0.7}
    seeds, diffs = paired_values(variant, baseline)
    assert seeds == [0, 1, 2]
    assert diffs == pytest.approx([0.1, 0.1, -0.05])
    got = paired_difference(variant, baseline)
    assert got.n == 3
    assert got.mean == pytest.approx(0.05)
    assert got == bootstrap_mean(diffs)


def test_pairing_removes_the_shared_seed_effect():
    # Seeds differ a lot, the variant is always exactly 0.02 better: paired, the interval is [0.02, 0.02].
    baseline = {0: 0.3, 1: 0.6, 2: 0.9}
    variant = {s: v + 0.02 for s, v in baseline.items()}
    got = paired_difference(variant, baseline)
    assert got.mean == pytest.approx(0.02)
    assert got.high - got.low < 1e-12


def test_best_index_follows_the_mode_and_skips_missing_means():
    assert best_index([0.5, 0.7, 0.6], "max") == 1
    assert best_index([0.5, 0.7, 0.6], "min") == 0
    assert best_index([math.nan, 0.4, 0.4], "max") == 1  # first on ties
    assert best_index([math.nan, math.nan], "max") is None
    with pytest.raises(ValueError, match="'max' or 'min'"):
        best_index([0.1], "best")


values = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=8)


@given(values)
def test_interval_lies_within_the_values(x):
    got = bootstrap_mean(x, resamples=500)
    assert min(x) <= got.low <= got.high <= max(x)
    assert min(x) <= got.mean <= max(x) or math.isclose(got.mean, min(x)) or math.isclose(got.mean, max(x))


@given(values, st.floats(-10, 10, allow_nan=False), st.floats(0.1, 10))
def test_interval_moves_with_a_shift_and_a_scale(x, shift, scale):
    base = bootstrap_mean(x, resamples=500)
    moved = bootstrap_mean([v * scale + shift for v in x], resamples=500)
    if base.low == base.high:
        return  # all equal up to rounding: both zero-width
    assert moved.low == pytest.approx(base.low * scale + shift, abs=1e-9)
    assert moved.high == pytest.approx(base.high * scale + shift, abs=1e-9)
