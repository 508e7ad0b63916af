"""Percentile-bootstrap confidence intervals over prompts, and paired comparisons of two policies.

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


# --- paired comparisons (two policies on the same prompts) -----------------------------------------

def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{int((~np.isfinite(values)).sum())} of {values.size} values are NaN or infinite")
    return values


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_resamples: int = 2000,
                      seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of the per-prompt differences a_i - b_i (shape [n] each, same prompts, same order) with
    a percentile bootstrap interval (scipy.stats.bootstrap) and a two-sided sign-flip permutation
    p-value (scipy.stats.permutation_test, permutation_type="samples": under H0 each pair's labels
    are exchangeable). Returns {"n", "mean", "low", "high", "p", "sd"}; NaNs when n < 2.
    Raises ValueError when the two samples differ in length or hold a NaN or infinity (scipy's
    permutation test would return a spuriously small p)."""
    from scipy import stats as scipy_stats

    a, b = _finite(a), _finite(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    d = a - b
    if d.size < 2:
        nan = float("nan")
        return {"n": int(d.size), "mean": float(d.mean()) if d.size else nan, "low": nan, "high": nan, "p": nan,
                "sd": nan}
    if np.all(d == d[0]):  # no spread: the interval is the point and the sign test is exact
        p = 1.0 if d[0] == 0 else float(2 * 0.5 ** d.size)
        return {"n": int(d.size), "mean": float(d[0]), "low": float(d[0]), "high": float(d[0]), "p": min(1.0, p),
                "sd": 0.0}
    rng = np.random.default_rng(seed)
    interval = scipy_stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                     method="percentile", rng=rng).confidence_interval
    test = scipy_stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                        permutation_type="samples", n_resamples=n_resamples,
                                        alternative="two-sided", rng=rng, vectorized=True)
    return {"n": int(d.size), "mean": float(d.mean()), "low": float(interval.low), "high": float(interval.high),
            "p": float(test.pvalue), "sd": float(d.std(ddof=1))}


def independent_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                           n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """mean(a) - mean(b) for two independent samples (shapes [n_a], [n_b]: different units, e.g.
    the pairs of two stages) with a percentile bootstrap interval (scipy.stats.bootstrap, each
    sample resampled alone) and a two-sided permutation p-value (scipy.stats.permutation_test,
    permutation_type="independent": under H0 the group labels are exchangeable).
    Returns {"n", "mean", "low", "high", "p", "se"} with n = n_a + n_b and se the unpooled
    standard error sqrt(var_a / n_a + var_b / n_b); NaNs when either sample has fewer than 2 values."""
    from scipy import stats as scipy_stats

    a, b = _finite(a), _finite(b)
    nan = float("nan")
    if a.size < 2 or b.size < 2:
        return {"n": int(a.size + b.size), "mean": nan, "low": nan, "high": nan, "p": nan, "se": nan}

    def difference(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    rng = np.random.default_rng(seed)
    mean, se = float(difference(a, b)), float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    if se == 0:  # both samples constant: every bootstrap resample is the point; the permutation test still applies
        low = high = mean
    else:
        interval = scipy_stats.bootstrap((a, b), difference, n_resamples=n_resamples, confidence_level=confidence,
                                         method="percentile", rng=rng).confidence_interval
        low, high = float(interval.low), float(interval.high)
    test = scipy_stats.permutation_test((a, b), difference, permutation_type="independent", n_resamples=n_resamples,
                                        alternative="two-sided", rng=rng, vectorized=True)
    return {"n": int(a.size + b.size), "mean": mean, "low": low, "high": high, "p": float(test.pvalue), "se": se}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; NaNs stay NaN and do not
    count as tests: p_(i) -> max over j <= i of min(1, (m - j + 1) p_(j)) for the sorted p's."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    running = 0.0
    for rank, index in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out.tolist()


def _z_sum(alpha: float, power: float) -> float:
    from scipy.stats import norm

    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided level-alpha paired test detects with probability
    `power`, normal approximation: (z_{1-alpha/2} + z_{power}) * sd / sqrt(n), sd the standard
    deviation of the per-unit differences. NaN for n < 2, a non-finite sd, or sd = 0 (no spread
    observed: the plug-in power calculation has nothing to go on)."""
    if n < 2 or not np.isfinite(sd) or sd <= 0:
        return float("nan")
    return _z_sum(alpha, power) * float(sd) / float(np.sqrt(n))


def detectable_from_se(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The same bound from a standard error directly ((z_{1-alpha/2} + z_{power}) * se), for
    statistics that are not a paired mean (two independent samples). NaN when se is not > 0."""
    if not np.isfinite(se) or se <= 0:
        return float("nan")
    return _z_sum(alpha, power) * float(se)


def needed_n(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units a paired test needs to detect `effect` with `power` (inverse of minimum_detectable_effect).
    Raises ValueError unless effect > 0 and sd is finite."""
    if effect <= 0 or not np.isfinite(sd):
        raise ValueError(f"effect must be > 0 and sd finite, got effect={effect}, sd={sd}")
    return int(np.ceil((_z_sum(alpha, power) * sd / effect) ** 2 - 1e-9))
