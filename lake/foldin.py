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

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.linalg.lapack import dposv


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
    y = np.asarray(factors[idx], dtype=np.float64)
    conf = params.confidence_offset + params.alpha * r  # c_i
    reg = params.regularization * float(idx.size) ** params.reg_exponent
    a = gram + (y.T * (conf - 1.0)) @ y
    a[np.diag_indices(k)] += reg
    b = conf @ y
    # Cholesky factor + solve in one LAPACK call (what scipy's cho_factor/cho_solve do, without
    # their per-call Python checks: this runs on every Recommend with a basket context)
    _, x, info = dposv(a, b, lower=1)
    if info != 0:  # not positive definite: least squares instead
        x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x.astype(np.float32)


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
