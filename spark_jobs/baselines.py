"""Baselines every ALS model is compared with, on the same split: popularity, EASE, item-kNN.

* Popularity: every user gets the items with the most training interactions (the number
  of users who interacted, ties by index); their own training items excluded.
* EASE (Steck 2019): closed form item-item model on the binarised training matrix X,
  B = I - P diag(1 / diag(P)), P = (X^T X + lambda I)^-1 (so diag(B) = 0); scores = X B.
  Inverts an items x items matrix: only up to `evaluate.ease_max_items` items.
* Item-kNN (BM25 weights, 100 neighbours per item): the strong baseline above that size.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from spark_jobs.metrics import ScoreFn


def popularity(train: sp.csr_matrix) -> np.ndarray:
    """Per-item number of training users (float64)."""
    x = sp.csr_matrix(train)
    return np.bincount(x.indices, minlength=x.shape[1]).astype(np.float64)


def popularity_scorer(train: sp.csr_matrix) -> ScoreFn:
    pop = popularity(train).astype(np.float32)

    def score(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(pop, (len(rows), pop.size))

    return score


def ease_weights(train: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE item-item weight matrix B (n_items x n_items, float32, zero diagonal).

    A batch step with the machine to itself, so BLAS and LAPACK use every core (the serving
    processes' one-thread limit, OPENBLAS_NUM_THREADS=1, is lifted here); P comes from a
    Cholesky factorisation (G + lambda I is symmetric positive definite): ~2x fewer flops
    than a general inverse.
    """
    import os

    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    with threadpool_limits(os.cpu_count() or 1, "blas"):
        g = cooccurrence(train)
        g[np.diag_indices_from(g)] += lam
        c, info = lapack.dpotrf(g, lower=True, overwrite_a=True)
        if info == 0:
            c, info = lapack.dpotri(c, lower=True, overwrite_c=True)
        if info != 0:
            raise RuntimeError(f"EASE: Cholesky inverse of the item gram matrix failed "
                               f"(LAPACK info {info})")
    b = np.tril(c)  # potri fills the lower triangle only
    b += np.tril(b, -1).T  # P, symmetric
    b /= -np.diag(b)  # B_ij = -P_ij / P_jj (np.diag's view is negated into a copy first)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def cooccurrence(train: sp.csr_matrix, block_bytes: int = 32 << 20) -> np.ndarray:
    """X^T X of the binarised matrix (users per item pair), dense float64.

    Summed over blocks of rows made dense (`block_bytes` each) by BLAS: ~1.5x faster than scipy's
    sparse product, whose result is nearly dense. Counts stay exact in float32 below 2^24
    users.
    """
    x = sp.csr_matrix(train, dtype=np.float32, copy=True)
    x.sum_duplicates()
    x.data[:] = 1.0
    n_users, n_items = x.shape
    dtype = np.float32 if n_users < 2**24 else np.float64
    g = np.zeros((n_items, n_items), dtype=dtype)
    step = max(1, block_bytes // max(1, 4 * n_items))
    for start in range(0, n_users, step):
        d = x[start:start + step].toarray().astype(dtype, copy=False)
        g += d.T @ d
    return g.astype(np.float64)


def ease_scorer(train: sp.csr_matrix, lam: float) -> ScoreFn:
    b = ease_weights(train, lam)
    x = sp.csr_matrix(train, dtype=np.float32, copy=True)
    x.data[:] = 1.0

    def score(rows: np.ndarray) -> np.ndarray:
        return np.asarray(x[rows] @ b)

    return score


def factor_scorer(user_factors: np.ndarray, item_factors: np.ndarray) -> ScoreFn:
    u = np.ascontiguousarray(user_factors, dtype=np.float32)
    v = np.ascontiguousarray(item_factors, dtype=np.float32)

    def score(rows: np.ndarray) -> np.ndarray:
        return u[rows] @ v.T

    return score


def itemknn_scorer(train: sp.csr_matrix, neighbours: int = 100) -> ScoreFn:
    """Item-kNN (implicit's BM25-weighted item-item similarity, `neighbours` per item) on the
    binarised training matrix; scores = X S. The strong baseline where EASE is too big."""
    from implicit.nearest_neighbours import BM25Recommender
    from threadpoolctl import threadpool_limits

    x = sp.csr_matrix(train, dtype=np.float32, copy=True)
    x.data[:] = 1.0
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        # implicit's own BM25 weighting hands its fit a COO matrix and warns about it
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        knn = BM25Recommender(K=neighbours)
        knn.fit(x, show_progress=False)
    sim = sp.csr_matrix(knn.similarity, dtype=np.float32)

    def score(rows: np.ndarray) -> np.ndarray:
        return np.asarray((x[rows] @ sim).todense())

    return score
