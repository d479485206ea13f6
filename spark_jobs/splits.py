"""Train/test splits of an interaction matrix (pure numpy/scipy, no I/O).

* `random_split`: per-user holdout. Each user with at least 2 items gives
  round(test_fraction * n_u) of them (at least 1, at most n_u - 1), chosen uniformly with a
  seeded generator, to the test set; users with one item stay entirely in train.
* `time_split`: by timestamp — entries whose time is at or after the cut-off go to test,
  the rest to train. (The lake-level time protocol, which decides which gold rows count as
  "first interacted after the cut-off", lives in `spark_jobs.evaluate`.)

Both return matrices of the same shape as the input, disjoint, summing to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class Split:
    train: sp.csr_matrix
    test: sp.csr_matrix
    protocol: str
    info: dict


def _mask_split(x: sp.csr_matrix, test_mask: np.ndarray, protocol: str, info: dict) -> Split:
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    def pick(mask: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((x.data[mask], (rows[mask], x.indices[mask])), shape=x.shape)
        m.sort_indices()
        return m
    return Split(pick(~test_mask), pick(test_mask), protocol, info)


def random_split(matrix: sp.csr_matrix, test_fraction: float, seed: int) -> Split:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x = sp.csr_matrix(matrix)
    x.sum_duplicates()
    n_u = np.diff(x.indptr)
    n_test = np.clip(np.floor(test_fraction * n_u + 0.5), 1, np.maximum(n_u - 1, 0))
    n_test[n_u < 2] = 0
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(x.shape[0]), n_u)
    order = np.lexsort((rng.random(x.nnz), rows))  # shuffled within each user
    rank = np.empty(x.nnz, dtype=np.int64)
    rank[order] = np.arange(x.nnz) - x.indptr[rows[order]]
    test_mask = rank < n_test[rows]
    return _mask_split(x, test_mask, "random",
                       {"test_fraction": test_fraction, "seed": seed})


def time_split(matrix: sp.csr_matrix, times: sp.csr_matrix, cutoff: float) -> Split:
    """`times` has the same sparsity as `matrix` (e.g. epoch seconds of each entry)."""
    x = sp.csr_matrix(matrix)
    t = sp.csr_matrix(times)
    if x.shape != t.shape or x.nnz != t.nnz or not (
        np.array_equal(x.indptr, t.indptr) and np.array_equal(x.indices, t.indices)
    ):
        raise ValueError("times must have exactly the sparsity pattern of the matrix")
    return _mask_split(x, t.data >= cutoff, "time", {"cutoff": cutoff})
