"""Train/test splits of an interaction matrix (pure numpy/scipy, no I/O).

* `random_split`: per-user holdout. Each user with at least 2 items gives
  round(test_fraction * n_u) of them (at least 1, at most n_u - 1), chosen uniformly with a
  seeded generator, to the test set; users with one item stay entirely in train.
* `user_time_split`: per-user temporal holdout. For each user with at least `min_items`
  distinct items, the last max(1, round(test_fraction * n_u)) of them by first-touch time
  go to test (an item tied with the earliest of those goes too), unless that would leave
  the user nothing to train on. Every user is tested on their own latest items, so a log
  that thins out at the end still yields many test users.
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
    test_mask: np.ndarray
    """(nnz,) bool over the input's entries (canonical CSR order): True where in test."""


def _mask_split(x: sp.csr_matrix, test_mask: np.ndarray, protocol: str, info: dict) -> Split:
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    def pick(mask: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((x.data[mask], (rows[mask], x.indices[mask])), shape=x.shape)
        m.sort_indices()
        return m
    return Split(pick(~test_mask), pick(test_mask), protocol, info, test_mask)


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


def user_time_split(first_touch: sp.csr_matrix, test_fraction: float, min_items: int) -> Split:
    """`first_touch`: (users x items) time of each pair's first event (all entries > 0)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x = sp.csr_matrix(first_touch)
    x.sum_duplicates()
    n_u = np.diff(x.indptr)
    rows = np.repeat(np.arange(x.shape[0]), n_u)
    n_test = np.maximum(1, np.floor(test_fraction * n_u + 0.5)).astype(np.int64)
    order = np.lexsort((x.data, rows))  # by user, then time
    # the cut is the time of the user's n_test-th latest item; ties with it go to test
    cut_pos = np.where(n_u > 0, x.indptr[:-1] + np.maximum(n_u - n_test, 0), 0)
    cut_t = np.full(x.shape[0], np.inf)
    has = n_u > 0
    cut_t[has] = x.data[order[cut_pos[has]]]
    test_mask = x.data >= cut_t[rows]
    n_train = np.bincount(rows[~test_mask], minlength=x.shape[0])
    eligible = (n_u >= min_items) & (n_train > 0)
    test_mask &= eligible[rows]
    split = _mask_split(x, test_mask, "user_time",
                        {"test_fraction": test_fraction, "min_items": min_items})
    split.test.data[:] = 1.0
    return split


def tuning_users(user_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool mask over `user_ids`: the users the recipe search scores (True) and the users
    the evaluation scores (False), by a seeded hash of the id.

    Both sides are tested on their own latest items of the same holdout, so the search
    validates on the very time slice and history depth the evaluation tests on (a split
    carved from earlier items preferred other settings than the test did: on MovieLens-1M
    alpha 0.03 over 0.5, which lost 1.3% NDCG on the test). Hashing the id keeps a user on
    one side as the log grows and across the processes of one DAG run.
    """
    import pandas as pd

    if not 0 < fraction < 1:
        raise ValueError(f"tuning users fraction must be in (0, 1), got {fraction}")
    ids = np.asarray(user_ids, dtype=object)
    h = pd.util.hash_array(ids, hash_key=f"lambdarec{seed:07d}"[-16:], categorize=False)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
