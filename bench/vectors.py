"""Item vectors that look like trained ALS factors (clustered, skewed norms), for ANN benchmarks.

i.i.d. Gaussian vectors are a known worst case for graph indexes and unlike real factors
(STACK.md measured HNSW recall 0.1-0.44 on them): real item factors cluster by taste and
their norms follow popularity.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, dim: int = 64, *, clusters: int = 200,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ALS-like item vectors and each row's cluster (Zipf-sized clusters, log-normal norms)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    sizes = rng.zipf(1.5, size=clusters).astype(np.float64)
    assign = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    v = centers[assign] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=(n, 1)).astype(np.float32)
    v *= norms / np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v, dtype=np.float32), assign.astype(np.int32)


def als_like_vectors(n: int, dim: int = 64, *, clusters: int = 200, seed: int = 0) -> np.ndarray:
    return clustered_vectors(n, dim, clusters=clusters, seed=seed)[0]


def user_like_queries(items: np.ndarray, n: int, *, seed: int = 1) -> np.ndarray:
    """Queries shaped like folded-in users: sums of a few item vectors plus noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, items.shape[0], size=(n, 5))
    q = items[picks].sum(axis=1) + 0.1 * rng.normal(size=(n, items.shape[1])).astype(np.float32)
    return np.ascontiguousarray(q, dtype=np.float32)
