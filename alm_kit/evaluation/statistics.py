"""Confidence intervals and significance for accuracies over test items and training seeds.

A model's result is a 0/1 matrix ``correct[seed, item]``: one row per training seed, one column per
test item, the same items for every model. Both are samples (of the questions one could ask, of
the runs one could train), so the bootstrap resamples both, crossed: items with replacement and,
independently, seeds with replacement; the statistic is the mean of the resampled matrix. Two
models are compared on the *same* resampled items (a paired test: an easy item is easy for both),
each with its own resampled seeds (seed k of one model has nothing to do with seed k of another).

numpy only: ``scipy.stats.bootstrap`` resamples one axis (not items and seeds crossed) and has no
paired two-model test, and scipy is not an alm-kit dependency. Every function takes a ``seed``:
the same inputs give the same interval and p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided percentile bootstrap interval."""

    mean: float
    low: float
    high: float


def _matrix(correct) -> np.ndarray:
    """``correct`` as a float (seeds, items) matrix; one seed may be given as a flat list."""
    matrix = np.asarray(correct, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"expected a non-empty (seeds, items) matrix of 0/1, got shape {matrix.shape}")
    return matrix


def _item_draws(n_items: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each item is drawn in each resample (resamples, items): n draws with replacement."""
    return rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=resamples)


def _resampled_means(matrix: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean of ``matrix`` per resample: its items weighted by ``draws``, its seeds drawn here."""
    per_seed = draws @ matrix.T / draws.shape[1]  # (resamples, seeds): each seed's accuracy on the drawn items
    seeds = rng.integers(0, matrix.shape[0], size=per_seed.shape)
    return np.take_along_axis(per_seed, seeds, axis=1).mean(1)


def bootstrap_interval(correct, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = 0) -> Interval:
    """Mean accuracy of a (seeds, items) 0/1 matrix with its bootstrap interval over items and seeds."""
    matrix = _matrix(correct)
    rng = np.random.default_rng(seed)
    means = _resampled_means(matrix, _item_draws(matrix.shape[1], resamples, rng), rng)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(matrix.mean()), float(low), float(high))


def paired_bootstrap_p(correct_a, correct_b, *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of "A and B are equally accurate" on the same items.

    The share of resampled differences (A - B) on the far side of zero, doubled: p < 0.05 exactly
    when the 95% interval of the difference excludes zero. Counted with one pseudo-resample
    ((k + 1) / (R + 1)), so p is never 0 from a finite number of resamples.
    """
    a, b = _matrix(correct_a), _matrix(correct_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired test needs the same items: {a.shape[1]} vs {b.shape[1]} columns")
    rng = np.random.default_rng(seed)
    draws = _item_draws(a.shape[1], resamples, rng)
    diff = _resampled_means(a, draws, rng) - _resampled_means(b, draws, rng)
    far_side = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
    return float(min(1.0, 2 * (far_side + 1) / (resamples + 1)))
