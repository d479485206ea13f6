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

* `ScaledALSTrainer` ("ials") — NumPy/SciPy ALS on MLlib's objective (c = 1 + alpha r,
  lambda scaled by each row's interaction count, as in Rendle et al. 2022, "Revisiting the
  Performance of iALS"), single node. Every half-step solves each row's normal equations
  exactly (float64, batched over rows of similar length); the last half-step is the user
  solve, so fold-in reproduces its user vectors exactly. Frequency-scaled lambda tolerates
  more factors than implicit's unscaled one (see bench/ and /work/shared/STACK.md).

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
import scipy.sparse as sp

from lake.config import TrainSettings
from lake.foldin import FoldInParams
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

    def fit(self, matrix: InteractionMatrix) -> ALSFactors: ...


def train_params(settings: TrainSettings) -> dict[str, Any]:
    """The hyper-parameters that define a model (stored with it, reused by evaluation)."""
    return {
        "backend": settings.backend,
        "factors": settings.factors,
        "regularization": settings.effective_regularization,
        "iterations": settings.iterations,
        "alpha": settings.alpha,
        "seed": settings.seed,
    }


def _check_matrix(matrix: InteractionMatrix) -> None:
    if matrix.nnz == 0 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise TrainError(f"cannot train on an empty interaction matrix {matrix.shape}")


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

    def fit(self, matrix: InteractionMatrix) -> ALSFactors:
        _check_matrix(matrix)
        from implicit.als import AlternatingLeastSquares
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
            model = AlternatingLeastSquares(
                factors=s.factors,
                regularization=s.effective_regularization,
                alpha=s.alpha,
                iterations=s.iterations,
                random_state=s.seed,
                use_gpu=gpu,
            )
            model.fit(cui, show_progress=False)
            if gpu:
                model = model.to_cpu()
            fit_s = time.perf_counter() - t0
            if self.final_user_step:
                # Exact re-solve of every user against the final item factors: the same
                # objective lake.foldin.fold_in solves (implicit's Cholesky path).
                users = model.recalculate_user(np.arange(cui.shape[0]), cui)
            else:
                users = model.user_factors
        total_s = time.perf_counter() - t0
        return ALSFactors(
            user_factors=np.ascontiguousarray(users, dtype=np.float32),
            item_factors=np.ascontiguousarray(model.item_factors, dtype=np.float32),
            foldin=FoldInParams.for_backend("implicit", alpha=s.alpha,
                                            regularization=s.effective_regularization),
            params=train_params(s) | {"backend": "implicit"},
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

    def fit(self, matrix: InteractionMatrix) -> ALSFactors:
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
            params=train_params(s) | {"backend": "mllib"},
            info={"device": "spark", "fit_seconds": round(fit_s, 3),
                  "total_seconds": round(fit_s, 3), "spark_master": spark.sparkContext.master},
        )


def scaled_half_step(
    r: sp.csr_matrix, other: np.ndarray, alpha: float, regularization: float,
    *, budget: int = 400_000,
) -> np.ndarray:
    """Solve every row x of `r` (n x m, values r_i >= 0) against `other` (m x k):

        (YtY + sum_i alpha r_i y_i y_i^T + lambda n_row I) x = sum_i (1 + alpha r_i) y_i

    i.e. `lake.foldin.fold_in` with scale_reg_by_count for every row at once. Rows are
    sorted by interaction count and solved in padded batches (at most `budget` padded
    entries each): one batched matmul builds the k x k systems, one batched solve
    (float64) answers them. Rows without interactions get 0.
    """
    y = np.asarray(other, dtype=np.float64)
    n, k = r.shape[0], y.shape[1]
    gram = y.T @ y
    yz = np.vstack([y, np.zeros((1, k))])  # padding row
    out = np.zeros((n, k))
    ip, ind, dat = r.indptr, r.indices, r.data
    cnt = np.diff(ip)
    order = np.argsort(cnt, kind="stable")
    order = order[cnt[order] > 0]
    diag = np.arange(k)
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e - s + 1) * cnt[order[e]] <= budget and e - s < 2048:
            e += 1
        rows = order[s:e]
        c = cnt[rows]
        pos = np.arange(c.max())[None, :]
        mask = pos < c[:, None]
        src = np.where(mask, ip[rows][:, None] + pos, 0)
        yp = yz[np.where(mask, ind[src], y.shape[0])]  # (b, L, k)
        val = np.where(mask, dat[src], 0.0)
        yw = yp * np.sqrt(alpha * val)[..., None]
        a = np.matmul(yw.transpose(0, 2, 1), yw)
        a += gram
        a[:, diag, diag] += regularization * c[:, None]
        b = np.einsum("bl,blk->bk", np.where(mask, 1.0 + alpha * val, 0.0), yp)
        out[rows] = np.linalg.solve(a, b[..., None])[..., 0]
        s = e
    return out


class ScaledALSTrainer:
    """ALS on MLlib's count-scaled objective, in NumPy (single node, CPU)."""

    backend = "ials"

    def __init__(self, settings: TrainSettings, *, init_std: float = 0.01) -> None:
        self.settings = settings
        self.init_std = init_std

    def fit(self, matrix: InteractionMatrix) -> ALSFactors:
        _check_matrix(matrix)
        s = self.settings
        lam = s.effective_regularization
        r = sp.csr_matrix(matrix.csr, dtype=np.float64, copy=True)
        r.eliminate_zeros()
        if r.data.size and (np.any(r.data < 0) or not np.all(np.isfinite(r.data))):
            raise TrainError("interaction values must be finite and >= 0")
        rt = sp.csr_matrix(r.T)
        rng = np.random.default_rng(s.seed)
        users = rng.normal(0.0, self.init_std, (r.shape[0], s.factors))
        items = rng.normal(0.0, self.init_std, (r.shape[1], s.factors))
        t0 = time.perf_counter()
        for _ in range(s.iterations):
            items = scaled_half_step(rt, users, s.alpha, lam)
            users = scaled_half_step(r, items, s.alpha, lam)  # last: users, exact fold-in
        fit_s = time.perf_counter() - t0
        return ALSFactors(
            user_factors=np.ascontiguousarray(users, dtype=np.float32),
            item_factors=np.ascontiguousarray(items, dtype=np.float32),
            foldin=FoldInParams.for_backend("ials", alpha=s.alpha, regularization=lam),
            params=train_params(s) | {"backend": "ials"},
            info={"device": "cpu", "fit_seconds": round(fit_s, 3),
                  "total_seconds": round(fit_s, 3)},
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
        return ScaledALSTrainer(settings)
    raise TrainError(
        f"unknown ALS backend {settings.backend!r}; expected 'implicit', 'mllib' or 'ials'"
    )
