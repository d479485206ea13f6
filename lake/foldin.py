"""Fold-in: the least-squares solve that turns a user's (or item's) interactions into a vector.

The batch trainers and the online server share this module, so a user folded in online
gets exactly the vector the trainer would have given them. Every ALS backend minimises the
Hu-Koren-Volinsky implicit objective, but parameterises it differently:

* implicit 0.7 (`implicit/cpu/als.py`): confidence c_i = alpha * v_i for matrix value v_i,
  lambda unscaled; our ImplicitTrainer feeds v_i = r_i + 1/alpha, so c_i = 1 + alpha * r_i:
      (YtY + sum_i (c_i - 1) y_i y_i^T + lambda I) x = sum_i c_i y_i
* Spark MLlib (`ALS.computeFactors`, implicitPrefs): c_i = 1 + alpha * r_i and the
  regulariser is scaled by the user's interaction count n_u
      (YtY + sum_i alpha r_i y_i y_i^T + lambda n_u I) x = sum_i (1 + alpha r_i) y_i
* ials (`spark_jobs.als.ScaledALSTrainer`, numba, single node): MLlib's objective with the
  count scaling generalised to lambda * n_u ** nu (frequency-scaled regularisation, Rendle
  et al. 2022, "Revisiting the Performance of iALS"); nu = `reg_exponent`.

`FoldInParams` captures all three with `confidence_offset` (c = offset + alpha r; 1 for all
our backends) and `reg_exponent` nu: the regulariser of a row with n interactions is
`regularization * n ** reg_exponent` (0 = implicit's unscaled lambda, 1 = MLlib's lambda n).
Items fold in symmetrically: swap the roles of users and items (Y -> X, YtY -> XtX).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldInParams:
    alpha: float
    regularization: float
    confidence_offset: float
    """c = offset + alpha r: 1 for all our backends (0 = implicit fed raw values)."""
    reg_exponent: float
    """nu: a row with n interactions is regularised by `regularization * n ** nu`
    (0 = implicit, 1 = MLlib, anything in between or above for ials)."""

    @classmethod
    def for_backend(
        cls, backend: str, *, alpha: float, regularization: float, reg_exponent: float = 1.0
    ) -> FoldInParams:
        """The objective `backend` trains with.

        Args:
            backend: "implicit", "mllib" or "ials".
            alpha: confidence slope (c = 1 + alpha r).
            regularization: lambda.
            reg_exponent: nu; used by "ials" only, the other backends have a fixed one
                (implicit 0, MLlib 1) whatever is passed.

        Raises:
            ValueError: unknown backend.
        """
        if backend == "implicit":
            # ImplicitTrainer feeds implicit r + 1/alpha, so its c = alpha * value = 1 + alpha r
            return cls(alpha, regularization, 1.0, 0.0)
        if backend == "mllib":
            return cls(alpha, regularization, 1.0, 1.0)
        if backend == "ials":
            # spark_jobs.als.ScaledALSTrainer: MLlib's objective with lambda * n ** nu
            return cls(alpha, regularization, 1.0, float(reg_exponent))
        raise ValueError(
            f"unknown ALS backend {backend!r}; expected 'implicit', 'mllib' or 'ials'"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldInParams:
        """Inverse of `to_dict`; also reads manifests written before `reg_exponent` existed,
        whose boolean `scale_reg_by_count` meant nu = 1 (True) or nu = 0 (False)."""
        if "reg_exponent" in d:
            nu = float(d["reg_exponent"])
        else:
            nu = 1.0 if bool(d["scale_reg_by_count"]) else 0.0
        return cls(
            alpha=float(d["alpha"]),
            regularization=float(d["regularization"]),
            confidence_offset=float(d["confidence_offset"]),
            reg_exponent=nu,
        )


def gramian(factors: np.ndarray) -> np.ndarray:
    """YtY in float64 (computed once per model, shipped in the bundle)."""
    f = np.asarray(factors, dtype=np.float64)
    return f.T @ f


def fold_in(
    factors: np.ndarray,
    gram: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    params: FoldInParams,
) -> np.ndarray:
    """Solve for one row vector given its interactions.

    Args:
        factors: the *other side's* factor matrix (n x k): item factors to fold in a user.
        gram: `gramian(factors)` (k x k, float64).
        indices: row indices into `factors` of the interacted entities (unique).
        values: raw interaction strengths r_i > 0 (the values the trainer saw, before alpha).
        params: the trainer's objective.

    Returns:
        The folded-in vector (k,), float32. All-zero when there are no interactions.
    """
    idx = np.asarray(indices, dtype=np.int64)
    r = np.asarray(values, dtype=np.float64)
    if idx.shape != r.shape or idx.ndim != 1:
        raise ValueError(
            f"indices and values must be 1-D of equal length, got {idx.shape} and {r.shape}"
        )
    k = gram.shape[0]
    if idx.size == 0:
        return np.zeros(k, dtype=np.float32)
    if np.any(r <= 0) or not np.all(np.isfinite(r)):
        raise ValueError("interaction values must be finite and > 0")
    reg = params.regularization * float(idx.size) ** params.reg_exponent
    x, ok = _solve()(factors, np.asarray(gram, dtype=np.float64), idx, r, float(params.alpha),
                     float(params.confidence_offset), reg)
    if not ok:  # not positive definite: least squares instead
        y = np.asarray(factors[idx], dtype=np.float64)
        conf = params.confidence_offset + params.alpha * r  # c_i
        a = gram + (y.T * (conf - 1.0)) @ y
        a[np.diag_indices(k)] += reg
        x = np.linalg.lstsq(a, conf @ y, rcond=None)[0]
    return np.asarray(x, dtype=np.float32)


def warm_up() -> None:
    """Compile (or load from numba's cache) the solve for the serving types now, so the
    first request that folds in does not wait for it (~1 s cold, ~0.4 s cached)."""
    factors = np.eye(2, dtype=np.float32)
    fold_in(factors, gramian(factors), np.arange(2), np.ones(2),
            FoldInParams(alpha=1.0, regularization=0.1, confidence_offset=1.0,
                         reg_exponent=0.0))


@functools.cache
def _solve() -> Any:
    """The compiled normal-equations solve (numba, compiled on first use, cached on disk).

    One call that holds the GIL throughout: the NumPy / LAPACK version released it in each
    of its BLAS and LAPACK calls, and in a gRPC server every release is a chance for a
    thread switch (a Recommend with a basket context, which folds in on every request,
    cost 1.0 ms of server CPU and 28 context switches against 0.56 ms and 14 for one
    without). Same float32 vectors as that version on 300 random cases."""
    from numba import njit

    return njit(cache=True, boundscheck=False)(_normal_equations)


def _normal_equations(factors: np.ndarray, gram: np.ndarray, idx: np.ndarray, r: np.ndarray,
                      alpha: float, offset: float, reg: float) -> tuple[np.ndarray, bool]:
    """x solving (gram + sum_i (c_i - 1) y_i y_i^T + reg I) x = sum_i c_i y_i with
    c_i = offset + alpha r_i, y_i = factors[idx[i]], by Cholesky (lower triangle); (x,
    False) when the matrix is not positive definite."""
    k = gram.shape[0]
    a = gram.copy()
    b = np.zeros(k)
    y = np.empty(k)
    for j in range(idx.size):
        c = offset + alpha * r[j]
        w = c - 1.0
        row = factors[idx[j]]
        for p in range(k):
            y[p] = row[p]
        for p in range(k):
            b[p] += c * y[p]
            wyp = w * y[p]
            for q in range(p + 1):
                a[p, q] += wyp * y[q]
    for p in range(k):
        a[p, p] += reg
    for j in range(k):  # Cholesky: a = L L^T, L in the lower triangle of a
        s = a[j, j]
        for t in range(j):
            s -= a[j, t] * a[j, t]
        if not s > 0.0:
            return b, False
        d = np.sqrt(s)
        a[j, j] = d
        for i in range(j + 1, k):
            s = a[i, j]
            for t in range(j):
                s -= a[i, t] * a[j, t]
            a[i, j] = s / d
    for i in range(k):  # L z = b
        s = b[i]
        for t in range(i):
            s -= a[i, t] * b[t]
        b[i] = s / a[i, i]
    for i in range(k - 1, -1, -1):  # L^T x = z
        s = b[i]
        for t in range(i + 1, k):
            s -= a[t, i] * b[t]
        b[i] = s / a[i, i]
    return b, True


def contributions(
    vector: np.ndarray, factors: np.ndarray, indices: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """How much each interacted item contributed to the score of `target` (for explanations).

    Uses the item-item similarity in factor space, y_i . y_target, which is the term
    through which item i pulled the user vector toward the target (cf. implicit's
    `explain`, simplified to the linear part).
    """
    del vector  # the linear approximation does not need the user vector itself
    y = np.asarray(factors[np.asarray(indices, dtype=np.int64)], dtype=np.float32)
    return y @ np.asarray(target, dtype=np.float32)
