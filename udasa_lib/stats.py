"""Percentile-bootstrap confidence intervals over prompts (numpy only).

Evaluation numbers in this replication (win rates, accuracies) are means over a few hundred
prompts, so the prompt sample is the dominant source of noise; resampling prompts with
replacement is the simplest honest error bar that makes no distributional assumption.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(statistic(values), low, high): percentile bootstrap of any scalar statistic of a 1-D sample.

    Empty input gives NaNs rather than raising, so a report table with an empty cell still renders.
    """
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = _resample_indices(values.size, n_boot, seed)
    stats = np.array([statistic(values[row]) for row in idx], dtype=float)
    return (float(statistic(values)), *_percentiles(stats, confidence))


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean, vectorised (the common case)."""
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = values[_resample_indices(values.size, n_boot, seed)].mean(axis=1)
    return (float(values.mean()), *_percentiles(means, confidence))
