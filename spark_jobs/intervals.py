"""Bootstrap confidence intervals over users (numpy only).

An evaluation averages a per-user metric over a sample of test users; how far that mean
can move with another sample is what the gate must know before it trusts a difference.
Users are resampled with replacement (`n_boot` times, seeded); the interval is the
percentile interval of the resampled means. Two models scored on the same users are
compared *paired*: the interval is that of the mean per-user difference, which is much
tighter than the two separate intervals suggest.
"""

from __future__ import annotations

import numpy as np


def _resample_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(1, v.size))
    for s in range(0, n_boot, chunk):
        e = min(n_boot, s + chunk)
        idx = rng.integers(0, v.size, size=(e - s, v.size))
        out[s:e] = v[idx].mean(axis=1)
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 500, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (per-user metric values)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means = _resample_means(v, n_boot, seed)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 500, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi) for per-user values of two models on the same users."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot, confidence, seed)
    return float(d.mean()), lo, hi
