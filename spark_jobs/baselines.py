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
    """EASE item-item weight matrix B (n_items x n_items, float32, zero diagonal)."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    x = sp.csr_matrix(train, dtype=np.float64, copy=True)
    x.data[:] = 1.0
    g = (x.T @ x).toarray()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = p / (-np.diag(p))
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


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
