"""Statistics of an ablation study: means over seeds with seeded bootstrap confidence intervals, and
differences between two variants paired by seed.

The interval is scipy's **percentile** bootstrap of the mean (``scipy.stats.bootstrap`` with
``method="percentile"``), not BCa. Studies have 3 to 5 seeds: with 3 values there are only 10
distinct resamples, BCa's acceleration is a jackknife over those 3 values (very noisy), and BCa
returns NaN (with a warning) whenever the resampled means are degenerate, which ties among seeds
make common (accuracies of 1.0, say). The percentile interval is defined for any sample with two
distinct values, always lies between the smallest and the largest value, and is what rliable
reports for few-seed studies. With so few seeds it is narrower than the true 95% interval; it
says how much the seeds disagree, and it should be read that way (see docs/ablation.md).

Edge cases are decided here, not left to scipy: no value gives no mean and no interval; one value
gives its mean and no interval (NaN bounds); values that are all equal give a zero-width interval
at that value. The resampling generator is seeded, so the same values always give the same
interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with the bounds of its bootstrap confidence interval.

    ``low``/``high`` are NaN when there is no interval (fewer than two values); ``mean`` is NaN when
    there are no values.
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        """Whether the bounds are defined (two or more values)."""
        return not (math.isnan(self.low) or math.isnan(self.high))


def bootstrap_mean(
    values: Iterable[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The mean of ``values`` and its percentile-bootstrap confidence interval.

    The resamples come from ``numpy.random.default_rng(seed)``, so a call is reproducible: scipy
    draws ``rng.integers(0, n, (resamples, n))`` as the resampled indices and takes the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear interpolation) of the
    resampled means. Non-finite values are refused: a diverged run is a failed run, not a value.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"bootstrap_mean takes a flat sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_mean got NaN or infinite values; leave failed runs out first")
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(x))
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    if np.all(x == x[0]):
        value = float(x[0])
        return Interval(value, value, value, n)
    result = stats.bootstrap(
        (x,),
        np.mean,
        vectorized=True,
        method="percentile",
        confidence_level=confidence,
        n_resamples=resamples,
        rng=np.random.default_rng(seed),
    )
    # Mathematically the bounds lie within [min, max]; scipy's mean can round one ulp outside.
    lo, hi = float(np.min(x)), float(np.max(x))
    low = min(max(float(result.confidence_interval.low), lo), hi)
    high = min(max(float(result.confidence_interval.high), lo), hi)
    return Interval(mean, low, high, n)


def paired_values(
    variant: Mapping[int, float], baseline: Mapping[int, float]
) -> tuple[list[int], list[float]]:
    """The seeds both mappings (seed -> value) have, sorted, and ``variant - baseline`` at each."""
    seeds = sorted(set(variant) & set(baseline))
    return seeds, [float(variant[s]) - float(baseline[s]) for s in seeds]


def paired_difference(
    variant: Mapping[int, float],
    baseline: Mapping[int, float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The mean of ``variant - baseline`` over the seeds both have, with its bootstrap interval.

    Pairing by seed removes what the two runs of one seed share (data order, initialisation
    stream), so the interval of the paired difference is what says whether a variant is better;
    seeds only one side has are left out.
    """
    _, diffs = paired_values(variant, baseline)
    return bootstrap_mean(diffs, confidence=confidence, resamples=resamples, seed=seed)


def best_index(means: Sequence[float], mode: str) -> int | None:
    """The index of the best finite mean (``mode`` "max" or "min"); the first one on ties; None
    when no mean is finite."""
    if mode not in ("max", "min"):
        raise ValueError(f"selection mode must be 'max' or 'min', got {mode!r}")
    best: int | None = None
    for i, m in enumerate(means):
        if not math.isfinite(m):
            continue
        if best is None or (m > means[best] if mode == "max" else m < means[best]):
            best = i
    return best
