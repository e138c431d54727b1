"""The statistics every study reports (one implementation each):

* :func:`wilson` -- the Wilson score interval of a proportion (Wilson 1927; Newcombe 1998, method 3);
* :func:`paired_bootstrap` -- a percentile bootstrap CI of a statistic's difference between two conditions
  measured on the same items (items resampled jointly; Efron & Tibshirani 1993, ch. 13), with a fixed seed,
  and :func:`bootstrap_ci` for one condition's statistic;
* :func:`mcnemar_exact` -- the exact (binomial) McNemar test of paired right/wrong outcomes (McNemar 1947):
  under H0 the discordant pairs split 50/50, ``p = min(1, 2 * P(Bin(b + c, 1/2) <= min(b, c)))``;
* :func:`holm` -- Holm's step-down adjustment of p-values for a family of tests (Holm 1979);
* :func:`min_n_for_halfwidth` -- the least n whose worst-case (p = 1/2) Wilson half-width is at most ``h``:
  a study refuses a verdict below it;
* training curves: :func:`spike_ratios` / :func:`count_spikes` -- a step is a spike when its value exceeds
  ``k`` times the median of the ``window`` steps before it (a NaN step is a spike), :func:`spike_flags` the same rule per step; :func:`trailing_mean` (the smoothed curve) and
  :func:`seed_spread` -- the per-step standard deviation across seeds of smoothed curves, averaged over steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "Z95",
    "bootstrap_ci",
    "column_spread",
    "count_spikes",
    "holm",
    "mcnemar_exact",
    "min_n_for_halfwidth",
    "paired_bootstrap",
    "seed_spread",
    "spike_flags",
    "spike_ratios",
    "trailing_mean",
    "wilson",
]

#: the two-sided 95% normal quantile (1.959964...)
Z95 = NormalDist().inv_cdf(0.975)
N_BOOT = 10_000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(k / n, low, high)``: the proportion and its Wilson score interval,
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``."""
    if not (isinstance(n, int) and n >= 1) or not (isinstance(k, int) and 0 <= k <= n):
        raise ValueError(f"wilson needs integers 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")
    z = _z(confidence)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, mid - half), min(1.0, mid + half)


def min_n_for_halfwidth(h: float, confidence: float = 0.95) -> int:
    """The least n for which the Wilson interval at p = 1/2 (its widest) has half-width <= ``h``."""
    if not 0.0 < h < 0.5:
        raise ValueError(f"half-width {h!r} must be in (0, 0.5)")
    z = _z(confidence)
    # half-width at p=1/2: z sqrt(1/4n + z^2/4n^2) / (1 + z^2/n) = z / (2 sqrt(n + z^2))
    n = max(1, math.ceil((z / (2 * h)) ** 2 - z * z))
    while z / (2 * math.sqrt(n + z * z)) > h:
        n += 1
    return n


def _as_items(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 0 or len(a) == 0:
        raise ValueError(f"need a non-empty sequence of per-item values, got {x!r}")
    return a


def _mean(v: np.ndarray) -> float:
    return float(v.mean())


def _resampled(a: np.ndarray, idx: np.ndarray, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """``stat`` of every resample (rows ``idx``): vectorised for the mean and for a ``batched`` stat (one that
    takes the stacked resamples, shape ``(n_boot, *a.shape)``)."""
    if stat is _mean and a.ndim == 1:
        return a[idx].mean(axis=1)
    if getattr(stat, "batched", False):
        return np.asarray(stat(a[idx]))
    return np.array([stat(a[i]) for i in idx])


def bootstrap_ci(x: Sequence[Any], stat: Callable[[np.ndarray], float] = _mean, confidence: float = 0.95,
                 n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """``(stat(x), low, high)``: the percentile bootstrap interval of ``stat`` over items (rows of ``x``)."""
    a = _as_items(x)
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boots = _resampled(a, idx, stat)
    boots = boots[~np.isnan(boots)]
    if not len(boots):  # e.g. a ratio whose denominator is 0 in every resample
        return stat(a), math.nan, math.nan
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return stat(a), float(lo), float(hi)


def paired_bootstrap(x: Sequence[Any], y: Sequence[Any], stat: Callable[[np.ndarray], float] = _mean,
                     confidence: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """The difference ``stat(y) - stat(x)`` of two conditions on the same items (row i of ``x`` and of ``y`` is
    item i; rows may be vectors, e.g. (hallucinated, mentions) for a ratio ``stat``), its percentile bootstrap
    interval (items resampled jointly, ``seed`` fixed) and a two-sided bootstrap p-value
    ``min(1, 2 min(P*(d <= 0), P*(d >= 0)))``. Returns ``{"diff", "low", "high", "p"}``."""
    a, b = _as_items(x), _as_items(y)
    if a.shape != b.shape:
        raise ValueError(f"paired conditions need the same items: shapes {a.shape} and {b.shape}")
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    d = _resampled(b, idx, stat) - _resampled(a, idx, stat)
    d = d[~np.isnan(d)]
    diff = stat(b) - stat(a)
    if len(d) == 0:
        return {"diff": diff, "low": math.nan, "high": math.nan, "p": math.nan}
    lo, hi = np.quantile(d, [(1 - confidence) / 2, (1 + confidence) / 2])
    p = 1.0 if diff == 0 and np.all(d == 0) else min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"diff": float(diff), "low": float(lo), "high": float(hi), "p": p}


def mcnemar_exact(x: Sequence[bool], y: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of paired right/wrong outcomes ``x`` (reference) and ``y`` on the same items:
    ``b`` = items right in x only, ``c`` = right in y only; ``p`` two-sided (1.0 with no discordant pair)."""
    if len(x) != len(y) or not len(x):
        raise ValueError(f"McNemar needs two equally long non-empty outcome lists, got {len(x)} and {len(y)}")
    b = sum(bool(u) and not bool(v) for u, v in zip(x, y))
    c = sum(bool(v) and not bool(u) for u, v in zip(x, y))
    m = b + c
    if m == 0:
        return {"b": 0, "c": 0, "p": 1.0}
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return {"b": b, "c": c, "p": min(1.0, 2 * tail)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given; NaN stays NaN and is not counted in the family)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _series(x: Sequence[float], window: int, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} needs a 1-d series, got shape {a.shape}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid: must be an int >= 1")
    return a


def spike_ratios(x: Sequence[float], window: int) -> np.ndarray:
    """``x[t] / median(x[t - window : t])`` for every step ``t >= window`` (the running median of the steps
    before ``t``, not including it): how far each step sits above its recent level."""
    a = _series(x, window, "spike_ratios")
    if len(a) <= window:
        return np.zeros(0)
    past = np.lib.stride_tricks.sliding_window_view(a[:-1], window)
    med = np.median(past, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return a[window:] / med


def count_spikes(x: Sequence[float], k: float, window: int) -> int:
    """The number of steps ``t >= window`` with ``x[t] > k * median(x[t - window : t])`` (a loss or gradient-norm
    spike; ``k > 1`` fixed before the run)."""
    return int(np.sum(spike_flags(x, window, k)))


def spike_flags(x: Sequence[float], window: int, k: float) -> list[bool]:
    """For each step ``t >= window``: whether ``x[t] > k * median(x[t - window : t])`` (NaN counts as a spike);
    ``len(x) - window`` flags (none for a shorter curve)."""
    if not k > 1.0:
        raise ValueError(f"k={k!r} is invalid: a spike is k times the running median, k must be > 1")
    return (~(spike_ratios(x, window) <= k)).tolist()


def trailing_mean(x: Sequence[float], window: int) -> np.ndarray:
    """The mean of the last ``window`` values at every step (fewer at the start): a smoothed training curve of
    the same length, using no future step."""
    a = _series(x, window, "trailing_mean")
    c = np.concatenate([[0.0], np.cumsum(a)])
    idx = np.arange(1, len(a) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def seed_spread(curves: Sequence[Sequence[float]], window: int) -> float:
    """Variance of a training curve across seeds: the standard deviation over seeds (ddof=1) of the
    trailing-mean-smoothed curves at each step, averaged over the steps all curves have (rows: seeds)."""
    if len(curves) < 2:
        raise ValueError(f"seed_spread needs curves of at least 2 seeds, got {len(curves)}")
    n = min(len(c) for c in curves)
    if n < 1:
        raise ValueError("seed_spread needs non-empty curves")
    return column_spread(np.stack([trailing_mean(list(c)[:n], window) for c in curves]))


def column_spread(a: np.ndarray) -> Any:
    """The standard deviation over the rows (ddof=1) of every column of ``a``, averaged over the columns (rows:
    seeds, columns: steps); a stack of such arrays gives one value each (``batched``: bootstraps vectorise)."""
    a = np.asarray(a, dtype=float)
    out = a.std(axis=-2, ddof=1).mean(axis=-1)
    return float(out) if a.ndim == 2 else out


column_spread.batched = True  # type: ignore[attr-defined]
