"""ALS training behind one small interface, with three backends.

    trainer = make_trainer(settings.train, spark=None)
    result = trainer.fit(matrix)          # InteractionMatrix -> ALSFactors

* `ImplicitTrainer` — implicit 0.7.3 `AlternatingLeastSquares` (CPU by default; the GPU
  when `use_gpu` is true, or None and implicit reports CUDA). Runs inside
  `threadpool_limits(1, "blas")` (implicit parallelises with OpenMP; BLAS threads on top
  only fight for the cores). Seeded. implicit's iterations end with an item step and use
  3 conjugate-gradient steps per solve, so its user vectors are neither exact nor computed
  against the final item factors; with `final_user_step` (default) every user is
  re-solved exactly against the final item factors with implicit's Cholesky solver —
  the very objective `lake.foldin.fold_in` solves — so a user folded in online gets the
  batch vector (cosine 1.0 instead of ~0.98-0.999, see tests/test_foldin_consistency.py).
* `MLlibTrainer` — Spark MLlib `ALS(implicitPrefs=True)` on integer ids from the dense id
  maps. `fit(matrix)` (in-memory input, e.g. an evaluation split) hands the entries to
  Spark through a temporary Parquet file; `fit_dataframe(df, user_ids, item_ids)` (the
  job path) joins gold's string ids to the id maps as a broadcast DataFrame, so the
  interactions never pass through the driver. Only the factors (n_users + n_items rows)
  are collected. MLlib's last half-step updates users against the final item factors
  with an exact Cholesky solve, so fold-in reproduces its user vectors as is.

* `ScaledALSTrainer` ("ials") — ALS on MLlib's objective with frequency-scaled
  regularisation: c = 1 + alpha r, lambda * n ** reg_exponent for a row with n interactions
  (Rendle et al. 2022, "Revisiting the Performance of iALS"), compiled with numba and
  parallel over rows on one node. Every half-step solves each row's normal equations
  exactly (one BLAS matmul for sum_i alpha r_i y_i y_i^T, then a k x k Cholesky); the last
  half-step is a float64 user solve, so fold-in reproduces its user vectors exactly.
  Optionally (`cg_steps`) the intermediate half-steps take warm-started conjugate-gradient
  steps instead, like implicit. Frequency-scaled lambda tolerates more factors than
  implicit's unscaled one (see bench/ials_speed.py and /work/shared/STACK.md).

All return `ALSFactors` with the `FoldInParams` of the objective they solved.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# numba's np.dot calls scipy's bundled OpenBLAS. Importing it here loads that library before
# any `threadpool_limits(1, "blas")`, which only limits the libraries already loaded: else
# each numba thread's matmuls spawn BLAS threads of their own (measured 2x-40x slower).
import scipy.linalg.cython_blas  # noqa: F401
import scipy.sparse as sp
from numba import get_num_threads, njit, prange

from lake.config import TrainSettings
from lake.foldin import FoldInParams, fold_in, gramian
from spark_jobs.matrix import InteractionMatrix

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class TrainError(ValueError):
    """Training was asked for something impossible (empty matrix, unknown backend...)."""


@dataclass
class ALSFactors:
    user_factors: np.ndarray
    """(n_users, k) float32, rows in the matrix's user order."""
    item_factors: np.ndarray
    """(n_items, k) float32, rows in the matrix's item order."""
    foldin: FoldInParams
    params: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    """fit_seconds, device, ..."""


class ALSTrainer(Protocol):
    backend: str

    def fit(self, matrix: InteractionMatrix, users: np.ndarray | None = None) -> ALSFactors:
        """Train on `matrix`. `users`: the rows whose vectors will be used (an evaluation's
        scored users); a trainer may skip work for the others, whose vectors are then
        those of its last iteration. Default: every row."""
        ...


def train_params(settings: TrainSettings, backend: str | None = None) -> dict[str, Any]:
    """The hyper-parameters that define a model (stored with it, reused by evaluation).

    Args:
        settings: the training settings.
        backend: the trainer that used them (default `settings.backend`). It decides
            `reg_exponent`: the exponent the objective actually used (implicit 0, MLlib 1,
            ials `settings.reg_exponent`).
    """
    backend = backend or settings.backend
    objective = FoldInParams.for_backend(backend, alpha=settings.alpha,
                                         regularization=settings.effective_regularization,
                                         reg_exponent=settings.reg_exponent)
    return {
        "backend": backend,
        "factors": settings.factors,
        "regularization": settings.effective_regularization,
        "reg_exponent": objective.reg_exponent,
        "iterations": settings.iterations,
        "alpha": settings.alpha,
        "seed": settings.seed,
    }


def _check_matrix(matrix: InteractionMatrix) -> None:
    if matrix.nnz == 0 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise TrainError(f"cannot train on an empty interaction matrix {matrix.shape}")


def implicit_model(settings: TrainSettings, *, use_gpu: bool = False) -> Any:
    """implicit's `AlternatingLeastSquares` for `settings`, every hyper-parameter resolved
    (`regularization: null` = the backend's default, `effective_regularization`): the one
    constructor `ImplicitTrainer` and the bench's raw implicit fit share."""
    from implicit.als import AlternatingLeastSquares

    return AlternatingLeastSquares(
        factors=settings.factors,
        regularization=settings.effective_regularization,
        alpha=settings.alpha,
        iterations=settings.iterations,
        random_state=settings.seed,
        use_gpu=use_gpu,
    )


class ImplicitTrainer:
    """implicit 0.7.3 ALS (CPU or GPU)."""

    backend = "implicit"

    def __init__(self, settings: TrainSettings, *, final_user_step: bool = True) -> None:
        self.settings = settings
        self.final_user_step = final_user_step

    def use_gpu(self) -> bool:
        import implicit.gpu

        if self.settings.use_gpu is None:
            return bool(implicit.gpu.HAS_CUDA)
        if self.settings.use_gpu and not implicit.gpu.HAS_CUDA:
            raise TrainError("train.use_gpu is true but implicit was built without CUDA")
        return bool(self.settings.use_gpu)

    def fit(self, matrix: InteractionMatrix, users: np.ndarray | None = None) -> ALSFactors:
        _check_matrix(matrix)
        from threadpoolctl import threadpool_limits

        s = self.settings
        gpu = self.use_gpu()
        cui = sp.csr_matrix(matrix.csr, dtype=np.float32, copy=True)
        # implicit's confidence is alpha * value; feeding r + 1/alpha makes it 1 + alpha * r,
        # so an observed item never weighs less than an unobserved one (c >= 1), whatever the
        # decay did to r. lake.foldin solves the same objective (confidence_offset=1).
        cui.data += np.float32(1.0 / s.alpha)
        t0 = time.perf_counter()
        with threadpool_limits(1, "blas"):
            model = implicit_model(s, use_gpu=gpu)
            model.fit(cui, show_progress=False)
            if gpu:
                model = model.to_cpu()
            fit_s = time.perf_counter() - t0
            factors = np.array(model.user_factors, dtype=np.float32)
            if self.final_user_step:
                # Exact re-solve of the users (each independently) against the final item
                # factors: the objective lake.foldin.fold_in solves (implicit's Cholesky path).
                rows = np.arange(cui.shape[0]) if users is None else np.asarray(users)
                if rows.size:
                    factors[rows] = model.recalculate_user(rows, cui[rows])
        total_s = time.perf_counter() - t0
        return ALSFactors(
            user_factors=factors,
            item_factors=np.ascontiguousarray(model.item_factors, dtype=np.float32),
            foldin=FoldInParams.for_backend("implicit", alpha=s.alpha,
                                            regularization=s.effective_regularization),
            params=train_params(s, "implicit"),
            info={"device": "gpu" if gpu else "cpu", "fit_seconds": round(fit_s, 3),
                  "total_seconds": round(total_s, 3),
                  "final_user_step": self.final_user_step},
        )


class MLlibTrainer:
    """Spark MLlib ALS with implicit preferences."""

    backend = "mllib"

    def __init__(self, settings: TrainSettings, spark: SparkSession | None = None) -> None:
        self.settings = settings
        self._spark = spark

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from lake.spark_session import get_spark

            self._spark = get_spark()
        return self._spark

    def _als(self, n_blocks: int) -> Any:
        from pyspark.ml.recommendation import ALS

        s = self.settings
        return ALS(
            rank=s.factors,
            maxIter=s.iterations,
            regParam=s.effective_regularization,
            alpha=s.alpha,
            implicitPrefs=True,
            nonnegative=False,
            seed=s.seed,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            numUserBlocks=n_blocks,
            numItemBlocks=n_blocks,
            coldStartStrategy="nan",
        )

    def fit(self, matrix: InteractionMatrix, users: np.ndarray | None = None) -> ALSFactors:
        """Train from an in-memory matrix (handed to Spark as a temporary Parquet file)."""
        _check_matrix(matrix)
        rows, cols, vals = matrix.coo_arrays()
        tmp = Path(tempfile.mkdtemp(prefix="lambdarec-als-"))
        try:
            path = tmp / "ratings.parquet"
            pq.write_table(
                pa.table({"user": pa.array(rows, pa.int32()), "item": pa.array(cols, pa.int32()),
                          "rating": pa.array(vals, pa.float64())}),
                path,
            )
            df = self.spark.read.parquet(str(path))
            return self.fit_indexed(df, matrix.shape[0], matrix.shape[1])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fit_dataframe(
        self,
        interactions: DataFrame,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        *,
        value_column: str = "confidence",
    ) -> ALSFactors:
        """Train from a Spark DataFrame of (user_id, item_id, value) with string ids.

        `user_ids` / `item_ids` are the dense maps (row numbers = position); they are joined
        as small broadcast DataFrames. Rows whose ids are not in the maps are dropped.
        """
        from pyspark.sql import functions as F

        spark = self.spark
        umap = spark.createDataFrame(
            pa.table({"user_id": pa.array(np.asarray(user_ids).astype(str).tolist()),
                      "user": pa.array(np.arange(len(user_ids), dtype=np.int32))}).to_pandas()
        )
        imap = spark.createDataFrame(
            pa.table({"item_id": pa.array(np.asarray(item_ids).astype(str).tolist()),
                      "item": pa.array(np.arange(len(item_ids), dtype=np.int32))}).to_pandas()
        )
        df = (
            interactions.select("user_id", "item_id", F.col(value_column).cast("double")
                                .alias("rating"))
            .where(F.col("rating") > 0)
            .join(F.broadcast(umap), "user_id")
            .join(F.broadcast(imap), "item_id")
            .select("user", "item", "rating")
        )
        return self.fit_indexed(df, len(user_ids), len(item_ids))

    def fit_indexed(self, df: DataFrame, n_users: int, n_items: int) -> ALSFactors:
        """Train from (user int, item int, rating double) and collect the factors."""
        s = self.settings
        spark = self.spark
        n_blocks = max(1, min(10, int(spark.sparkContext.defaultParallelism)))
        t0 = time.perf_counter()
        model = self._als(n_blocks).fit(df)
        users = _collect_factors(model.userFactors, n_users, s.factors)
        items = _collect_factors(model.itemFactors, n_items, s.factors)
        fit_s = time.perf_counter() - t0
        return ALSFactors(
            user_factors=users,
            item_factors=items,
            foldin=FoldInParams.for_backend("mllib", alpha=s.alpha,
                                            regularization=s.effective_regularization),
            params=train_params(s, "mllib"),
            info={"device": "spark", "fit_seconds": round(fit_s, 3),
                  "total_seconds": round(fit_s, 3), "spark_master": spark.sparkContext.master},
        )


# --- ials: numba kernels ---------------------------------------------------------------------
#
# One row of a half-step solves the fold-in normal equations
#     (YtY + sum_i alpha r_i y_i y_i^T + lambda n^nu I) x = sum_i (1 + alpha r_i) y_i.
# Per row the n x k block of the other side's factors is gathered (scaled by sqrt(alpha r_i))
# and one BLAS matmul (np.dot -> scipy's OpenBLAS) builds sum_i alpha r_i y_i y_i^T; the k x k
# system is then factored by `_cholesky_solve`. The matmul is the bulk of the work (nnz k^2
# per half-step): intermediate half-steps run it in float32 (twice as fast; the optimiser does
# not need more), the final user step in float64, so the user vectors are exactly what
# `lake.foldin.fold_in` computes from the stored float32 item factors.
#
# No `nnan`/`ninf` in the fast-math flags: the Cholesky pivot test must see a NaN. Loop
# indices are unsigned where it matters: with signed ones numba emits negative-index
# wraparound code, which stops LLVM from vectorising the inner loops (3x slower).

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_PAD = 16
"""Dot products in `_cholesky_solve` run over multiples of this many entries: LLVM vectorises
them 4 x 4 doubles wide, and a scalar remainder loop (a dependent chain) would dominate."""
_CG_TOL = 1e-20
"""Squared residual below which a conjugate-gradient solve stops (implicit uses the same)."""


@njit(cache=True, fastmath=_FASTMATH, boundscheck=False)
def _cholesky_solve(a: np.ndarray, b: np.ndarray, low: np.ndarray) -> bool:
    """Solve a x = b (a: k x k symmetric positive definite, float64); b is overwritten by x.

    `low` (k x ceil(k / _PAD) * _PAD, float64 scratch) receives the Cholesky factor L
    (a = L L^T). It is zeroed first: the padded dot products rely on zeros above L's diagonal.
    (Zeroing each entry just before its dot product instead costs 3x: the vector loads then
    wait for the scalar store.) Returns False (b undefined) when a is not numerically
    positive definite.
    """
    k = np.uint64(a.shape[0])
    pad = np.uint64(_PAD)
    one = np.uint64(1)
    low[:, :] = 0.0
    for j in range(k):
        m = (j + pad - one) // pad * pad  # >= j; row j's entries in [j, m) are still 0
        s = 0.0
        for p in range(m):
            s += low[j, p] * low[j, p]
        d = a[j, j] - s
        if not d > 0.0:
            return False
        d = np.sqrt(d)
        low[j, j] = d
        inv = 1.0 / d
        for i in range(j + one, k):
            t = 0.0
            for p in range(m):
                t += low[i, p] * low[j, p]
            low[i, j] = (a[i, j] - t) * inv
    for i in range(k):  # L z = b
        t = 0.0
        for p in range(i):
            t += low[i, p] * b[p]
        b[i] = (b[i] - t) / low[i, i]
    for ii in range(k):  # L^T x = z, by rows of L (contiguous; by columns it is 3x slower)
        q = k - one - ii
        xq = b[q] / low[q, q]
        b[q] = xq
        for p in range(q):
            b[p] -= xq * low[q, p]
    return True


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _exact_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, other: np.ndarray,
    gram: np.ndarray, alpha: float, regularization: float, reg_exponent: float,
    gram64: bool, bounds: np.ndarray, out: np.ndarray, ok: np.ndarray,
) -> None:
    """Exact solve of every row (see `scaled_half_step`); writes out (float32) and ok."""
    k = other.shape[1]
    kp = (k + _PAD - 1) // _PAD * _PAD
    for c in prange(bounds.size - 1):
        # scratch per block of rows, not per row
        low = np.empty((k, kp))
        a = np.empty((k, k))
        b = np.empty(k)
        for u in range(bounds[c], bounds[c + 1]):
            s = indptr[u]
            m = indptr[u + 1] - s
            ok[u] = True
            if m == 0:
                out[u, :] = 0.0
                continue
            # Gather the rows scaled by sqrt(alpha r_i) and accumulate b in the same pass.
            b[:] = 0.0
            if gram64:
                y64 = np.empty((m, k))
                for j in range(m):
                    i = indices[s + j]
                    ar = alpha * data[s + j]
                    w = np.sqrt(ar)
                    conf = 1.0 + ar
                    for f in range(k):
                        v = np.float64(other[i, f])
                        y64[j, f] = w * v
                        b[f] += conf * v
                g = np.dot(y64.T, y64)
            else:
                y32 = np.empty((m, k), dtype=np.float32)
                for j in range(m):
                    i = indices[s + j]
                    ar = alpha * data[s + j]
                    w32 = np.float32(np.sqrt(ar))
                    conf = 1.0 + ar
                    for f in range(k):
                        v32 = other[i, f]
                        y32[j, f] = w32 * v32
                        b[f] += conf * np.float64(v32)
                g = np.dot(y32.T, y32).astype(np.float64)
            reg = regularization * np.float64(m) ** reg_exponent
            for f in range(k):
                for h in range(k):
                    a[f, h] = gram[f, h] + g[f, h]
                a[f, f] += reg
            if _cholesky_solve(a, b, low):
                for f in range(k):
                    out[u, f] = np.float32(b[f])
            else:
                ok[u] = False


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _cg_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, other: np.ndarray,
    gram: np.ndarray, alpha: float, regularization: float, reg_exponent: float,
    steps: int, bounds: np.ndarray, x_io: np.ndarray,
) -> None:
    """`steps` conjugate-gradient steps per row, warm-started from x_io (updated in place).

    Each step costs k^2 + 4 n k instead of the exact solve's n k^2 + k^3 / 3: implicit's
    default solver (`implicit/cpu/_als.pyx`, least_squares_cg), on this objective.
    """
    k = other.shape[1]
    for c in prange(bounds.size - 1):
        x = np.empty(k)
        r = np.empty(k)
        p = np.empty(k)
        ap = np.empty(k)
        for u in range(bounds[c], bounds[c + 1]):
            s = indptr[u]
            e = indptr[u + 1]
            if e == s:
                x_io[u, :] = 0.0
                continue
            reg = regularization * np.float64(e - s) ** reg_exponent
            for f in range(k):
                x[f] = x_io[u, f]
            # r = b - A x
            for f in range(k):
                t = reg * x[f]
                for h in range(k):
                    t += gram[f, h] * x[h]
                r[f] = -t
            for j in range(s, e):
                i = indices[j]
                ar = alpha * data[j]
                t = 0.0
                for f in range(k):
                    t += np.float64(other[i, f]) * x[f]
                w = 1.0 + ar - ar * t
                for f in range(k):
                    r[f] += w * np.float64(other[i, f])
            rs = 0.0
            for f in range(k):
                p[f] = r[f]
                rs += r[f] * r[f]
            for _ in range(steps):
                if rs < _CG_TOL:
                    break
                for f in range(k):
                    t = reg * p[f]
                    for h in range(k):
                        t += gram[f, h] * p[h]
                    ap[f] = t
                for j in range(s, e):
                    i = indices[j]
                    t = 0.0
                    for f in range(k):
                        t += np.float64(other[i, f]) * p[f]
                    t *= alpha * data[j]
                    for f in range(k):
                        ap[f] += t * np.float64(other[i, f])
                pap = 0.0
                for f in range(k):
                    pap += p[f] * ap[f]
                step = rs / pap
                rs_new = 0.0
                for f in range(k):
                    x[f] += step * p[f]
                    r[f] -= step * ap[f]
                    rs_new += r[f] * r[f]
                beta = rs_new / rs
                for f in range(k):
                    p[f] = r[f] + beta * p[f]
                rs = rs_new
            for f in range(k):
                x_io[u, f] = np.float32(x[f])


def _blocks(indptr: np.ndarray, row_cost: float) -> np.ndarray:
    """Boundaries of blocks of consecutive rows of about equal work (n + row_cost per row
    with n interactions), a few per thread. numba hands each thread an equal share of the
    blocks, so equal work per block balances the threads; the per-block scratch buffers are
    allocated once per block. (Passed in rather than computed in the kernel: a kernel that
    calls `numba.get_num_threads()` cannot be cached.)"""
    n = indptr.size - 1
    n_blocks = max(1, min(n, 8 * get_num_threads()))
    cost = np.diff(indptr).astype(np.float64) + row_cost
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    bounds = np.searchsorted(cum, np.linspace(0.0, cum[-1], n_blocks + 1), side="left")
    bounds[0], bounds[-1] = 0, n
    return np.maximum.accumulate(bounds).astype(np.int64)


def _csr_arrays(r: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays in the one dtype signature the kernels are compiled for."""
    return (np.ascontiguousarray(r.indptr, dtype=np.int64),
            np.ascontiguousarray(r.indices, dtype=np.int32),
            np.ascontiguousarray(r.data, dtype=np.float64))


def scaled_half_step(
    r: sp.csr_matrix, other: np.ndarray, alpha: float, regularization: float,
    reg_exponent: float = 1.0, *, gram64: bool = True,
) -> np.ndarray:
    """Solve every row x of `r` (n x m, values r_i > 0) exactly against `other` (m x k):

        (YtY + sum_i alpha r_i y_i y_i^T + lambda n_row^nu I) x = sum_i (1 + alpha r_i) y_i

    i.e. `lake.foldin.fold_in` for every row at once (numba, parallel over rows). Rows
    without interactions get 0. `other` is used as float32 (the precision factors are stored
    in); YtY, the right-hand side and the solve are float64, and so is sum_i alpha r_i y_i y_i^T
    unless `gram64` is False (float32 products: about twice as fast, relative error ~1e-6).
    Call inside `threadpool_limits(1, "blas")`: the per-row matmuls must not spawn BLAS threads
    under numba's.

    Returns:
        (n, k) float32.
    """
    y = np.ascontiguousarray(other, dtype=np.float32)
    gram = gramian(y)
    out = np.zeros((r.shape[0], y.shape[1]), dtype=np.float32)
    ok = np.ones(r.shape[0], dtype=np.bool_)
    indptr, indices, data = _csr_arrays(r)
    _exact_rows(indptr, indices, data, y, gram, float(alpha), float(regularization),
                float(reg_exponent), bool(gram64), _blocks(indptr, y.shape[1] / 6.0), out, ok)
    if not ok.all():
        # Not numerically positive definite (lambda = 0 and a rank-deficient row): the same
        # least-squares fallback as lake.foldin.fold_in, so the two still agree.
        p = FoldInParams(alpha, regularization, 1.0, reg_exponent)
        for u in np.flatnonzero(~ok):
            lo, hi = r.indptr[u], r.indptr[u + 1]
            out[u] = fold_in(y, gram, r.indices[lo:hi], r.data[lo:hi], p)
    return out


def scaled_cg_half_step(
    r: sp.csr_matrix, other: np.ndarray, x: np.ndarray, alpha: float, regularization: float,
    reg_exponent: float = 1.0, *, steps: int = 3,
) -> np.ndarray:
    """`steps` warm-started conjugate-gradient steps on the `scaled_half_step` objective.

    Args:
        x: (n, k) float32 current row vectors; updated in place and returned.
    """
    y = np.ascontiguousarray(other, dtype=np.float32)
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("x must be a C-contiguous float32 array")
    indptr, indices, data = _csr_arrays(r)
    _cg_rows(indptr, indices, data, y, gramian(y), float(alpha), float(regularization),
             float(reg_exponent), int(steps), _blocks(indptr, y.shape[1] / 4.0), x)
    return x


class ScaledALSTrainer:
    """ALS with frequency-scaled regularisation (lambda n^nu), numba on one node's CPUs.

    Every iteration solves the items against the users, then the users against the items.
    By default every half-step is exact (`scaled_half_step`); `cg_steps` > 0 replaces all but
    the last one with that many warm-started conjugate-gradient steps (`scaled_cg_half_step`,
    like implicit). The last half-step is always an exact float64 user solve, so
    `lake.foldin.fold_in` reproduces the user vectors. Threads: numba's (`NUMBA_NUM_THREADS`,
    default all cores); BLAS is held to one thread per numba thread.
    """

    backend = "ials"

    def __init__(
        self, settings: TrainSettings, *, init_std: float = 0.01, cg_steps: int = 0
    ) -> None:
        if cg_steps < 0:
            raise ValueError(f"cg_steps must be >= 0, got {cg_steps}")
        self.settings = settings
        self.init_std = init_std
        self.cg_steps = cg_steps

    def fit(self, matrix: InteractionMatrix, users: np.ndarray | None = None) -> ALSFactors:
        _check_matrix(matrix)
        from threadpoolctl import threadpool_limits

        s = self.settings
        lam, nu = s.effective_regularization, s.reg_exponent
        r = sp.csr_matrix(matrix.csr, dtype=np.float64, copy=True)
        r.eliminate_zeros()
        if r.data.size and (np.any(r.data < 0) or not np.all(np.isfinite(r.data))):
            raise TrainError("interaction values must be finite and >= 0")
        r.sort_indices()
        rt = sp.csr_matrix(r.T)
        rng = np.random.default_rng(s.seed)
        users = rng.normal(0.0, self.init_std, (r.shape[0], s.factors)).astype(np.float32)
        items = rng.normal(0.0, self.init_std, (r.shape[1], s.factors)).astype(np.float32)
        t0 = time.perf_counter()
        with threadpool_limits(1, "blas"):
            for it in range(s.iterations):
                last = it == s.iterations - 1
                if self.cg_steps:
                    items = scaled_cg_half_step(rt, users, items, s.alpha, lam, nu,
                                                steps=self.cg_steps)
                else:
                    items = scaled_half_step(rt, users, s.alpha, lam, nu, gram64=False)
                if self.cg_steps and not last:
                    users = scaled_cg_half_step(r, items, users, s.alpha, lam, nu,
                                                steps=self.cg_steps)
                else:
                    # the last step: exact and float64 -- what fold-in computes
                    users = scaled_half_step(r, items, s.alpha, lam, nu, gram64=last)
        fit_s = time.perf_counter() - t0
        return ALSFactors(
            user_factors=users,
            item_factors=items,
            foldin=FoldInParams.for_backend("ials", alpha=s.alpha, regularization=lam,
                                            reg_exponent=nu),
            params=train_params(s, "ials"),
            info={"device": "cpu", "fit_seconds": round(fit_s, 3),
                  "total_seconds": round(fit_s, 3), "threads": get_num_threads(),
                  "solver": f"cg{self.cg_steps}" if self.cg_steps else "cholesky"},
        )


def _collect_factors(df: DataFrame, n: int, k: int) -> np.ndarray:
    """MLlib's (id, features) factor DataFrame -> dense (n, k) float32 (missing ids: 0)."""
    table = df.select("id", "features").toArrow()
    out = np.zeros((n, k), dtype=np.float32)
    if table.num_rows == 0:
        return out
    ids = table.column("id").to_numpy()
    feats = table.column("features").combine_chunks()
    flat = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    out[ids] = flat.reshape(len(ids), k)
    return out


def make_trainer(settings: TrainSettings, spark: SparkSession | None = None) -> ALSTrainer:
    """The trainer for `settings.backend`."""
    if settings.backend == "implicit":
        return ImplicitTrainer(settings)
    if settings.backend == "mllib":
        return MLlibTrainer(settings, spark)
    if settings.backend == "ials":
        return ScaledALSTrainer(settings, cg_steps=settings.cg_steps)
    raise TrainError(
        f"unknown ALS backend {settings.backend!r}; expected 'implicit', 'mllib' or 'ials'"
    )
