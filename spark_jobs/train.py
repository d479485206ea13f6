"""Batch job: train ALS on one as-of partition of gold interactions and stage the model.

    python -m spark_jobs.train --as-of 2024-01-31 --version v20240131 [--backend mllib]
        [--factors 64] [--regularization X|auto] [--iterations 15] [--alpha 6.0]

extract: the gold partition `as_of` (one pinned Delta version) — read through delta-rs in
Arrow batches into the dense id maps + CSR (`spark_jobs.matrix`); the MLlib backend trains
from a Spark DataFrame of the same snapshot (`lake.spark_bridge.read_table`), joined to the
id maps by broadcast, so interactions never pass through the driver there.
transform: `make_trainer(recipe.train, spark).fit(...)`, with the recipe the tuning search
chose for this version (`spark_jobs.recipe.load_recipe`; the configured one without a search).
load: `save_staged(settings.model.dir, TrainedModel(...))` -> the bundle
`<models>/staging/<version>/bundle/` (`lake.bundle`, the format publish serves; a rerun of
the same version replaces it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from lake.config import Settings
from lake.tables import Lake
from lake.training_cut import TrainingCut, end_of_day
from spark_jobs.als import ALSFactors, ALSTrainer, MLlibTrainer, make_trainer
from spark_jobs.baselines import popularity
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args
from spark_jobs.eval_sample import (
    HELD_OUT_KEY,
    EvalSample,
    leave_out,
    resolve_users,
    version_sample,
)
from spark_jobs.event_log import lookback_log, silver_received_until
from spark_jobs.matrix import GOLD, InteractionMatrix, read_gold
from spark_jobs.recipe import load_recipe
from spark_jobs.staging import TrainedModel, save_staged

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def train_model(
    settings: Settings,
    matrix: InteractionMatrix,
    *,
    version: str,
    as_of: date | None,
    spark: SparkSession | None = None,
    lake: Lake | None = None,
    gold_version: int | None = None,
    sample: EvalSample | None = None,
) -> TrainedModel:
    """Fit `settings.train` on `matrix` and wrap the result as a `TrainedModel`.

    With the MLlib backend and a `lake`, training reads gold through Spark (job path);
    otherwise the in-memory matrix is used, without `sample`'s held-out pairs when they
    are few enough (`fit_for_evaluation`).
    """
    recipe = load_recipe(settings, version)
    trainer = make_trainer(recipe.train, spark)
    if isinstance(trainer, MLlibTrainer) and lake is not None and as_of is not None:
        from pyspark.sql import functions as F

        from lake.spark_bridge import read_table

        df = read_table(trainer.spark, lake, GOLD, gold_version,
                        partition_filter=f"as_of = '{as_of.isoformat()}'")
        df = df.where(F.col("as_of") == F.lit(as_of.isoformat()).cast("date"))
        result = trainer.fit_dataframe(df, matrix.user_ids, matrix.item_ids)
        held_out = None
    else:
        result, held_out = fit_for_evaluation(trainer, matrix, sample,
                                              settings.evaluate.reuse_fit_max_share)
    info = dict(result.info)
    if held_out is not None:
        info[HELD_OUT_KEY] = held_out
    if gold_version is not None:
        info["gold_version"] = gold_version
    info.update(n_users=matrix.shape[0], n_items=matrix.shape[1], nnz=matrix.nnz)
    return TrainedModel(
        version=version,
        backend=trainer.backend,
        as_of=as_of,
        params=result.params | {"recipe": recipe.to_dict()},
        foldin=result.foldin,
        user_ids=matrix.user_ids,
        item_ids=matrix.item_ids,
        user_factors=result.user_factors,
        item_factors=result.item_factors,
        user_items=matrix.csr,
        item_popularity=popularity(matrix.csr),
        info=info,
    )


def fit_for_evaluation(trainer: ALSTrainer, matrix: InteractionMatrix,
                       sample: EvalSample | None, max_share: float
                       ) -> tuple[ALSFactors, dict[str, Any] | None]:
    """Fit `matrix`; when the evaluation's held-out pairs are at most `max_share` of it, fit
    without them and re-solve their users on all their pairs (`spark_jobs.eval_sample`).

    Returns the factors and, when pairs were left out, what the staged model records.
    """
    if sample is None or sample.held_share > max_share:
        return trainer.fit(matrix), None
    t0 = time.perf_counter()
    kept = leave_out(matrix, sample)
    if kept is None:
        return trainer.fit(matrix), None
    leave_s = time.perf_counter() - t0
    result = trainer.fit(InteractionMatrix(matrix.user_ids, matrix.item_ids, kept))
    t0 = time.perf_counter()
    rows = np.unique(matrix.user_index(sample.held_user_ids))
    result.user_factors[rows] = resolve_users(matrix.csr[rows], result.item_factors,
                                              result.foldin)
    return result, {"fingerprint": sample.fingerprint, "users": int(len(rows)),
                    "pairs": int(matrix.nnz - kept.nnz),
                    "share": round(sample.held_share, 5),
                    # the evaluation's part of the train step
                    "seconds": round(leave_s + time.perf_counter() - t0, 3)}


def lake_sample(lake: Lake, settings: Settings, as_of: date, version: str) -> EvalSample | None:
    """The evaluation's sample for a train job run on its own (the DAG's task), when
    `evaluate.reuse_fit_max_share` allows leaving it out and the backend fits in memory."""
    recipe = load_recipe(settings, version)
    if settings.evaluate.reuse_fit_max_share <= 0 or recipe.train.backend == "mllib":
        return None
    from spark_jobs.evaluate import eval_holdout

    log = lookback_log(lake, as_of, settings.interactions.lookback_days)
    return version_sample(log, eval_holdout(log, settings), recipe.strength, settings, version)


def run(
    settings: Settings, *, as_of: date, version: str, spark: SparkSession | None = None,
    sample: EvalSample | None = None,
) -> dict[str, Any]:
    """Train on all gold interactions of `as_of` and stage the model as `version`.

    `sample`: the evaluation's (`spark_jobs.eval_sample`); read from the lake when not given.

    Returns:
        `{"job", "version", "backend", "as_of", "users", "items", "nnz", "factors",
        "fit_seconds", "device", "gold_version", "eval_held_out", "staged", "seconds"}`
        (`eval_held_out`: what the fit left out for the evaluation, or None).
    """
    t0 = time.perf_counter()
    lake = Lake.from_settings(settings.lake)
    if not lake.exists(GOLD):
        raise JobError(f"gold_interactions does not exist under {lake.root}; run interactions")
    gold_version = lake.version(GOLD)
    matrix = read_gold(lake, as_of, version=gold_version)
    if matrix.nnz == 0:
        raise JobError(f"gold_interactions has no rows for as_of={as_of}")
    if sample is None:
        sample = lake_sample(lake, settings, as_of, version)
    model = train_model(settings, matrix, version=version, as_of=as_of, spark=spark, lake=lake,
                        gold_version=gold_version, sample=sample)
    # What the model learned from, for the servers: events after this cut stay online.
    start = as_of - timedelta(days=settings.interactions.lookback_days)
    model.cut = TrainingCut(end_of_day(as_of), silver_received_until(lake, start, as_of))
    path = save_staged(settings.model.dir, model)
    return {
        "job": "train",
        "version": version,
        "backend": model.backend,
        "as_of": as_of,
        "users": matrix.shape[0],
        "items": matrix.shape[1],
        "nnz": matrix.nnz,
        "factors": model.factors,
        "fit_seconds": model.info.get("fit_seconds"),
        "device": model.info.get("device"),
        "gold_version": gold_version,
        "eval_held_out": model.info.get(HELD_OUT_KEY),
        "staged": str(path),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _regularization(text: str) -> float | None:
    return None if text.strip().lower() in ("auto", "none", "") else float(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = job_parser("spark_jobs.train", "Train ALS on gold interactions and stage the model.")
    p.add_argument("--as-of", dest="as_of", type=parse_date, required=True)
    p.add_argument("--version", required=True, help="model version name to stage")
    p.add_argument("--backend", choices=["implicit", "mllib", "ials"], default=None)
    p.add_argument("--factors", type=int, default=None)
    p.add_argument("--regularization", type=_regularization, default=None,
                   help="lambda, or 'auto' for the backend's default")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)

    def body(args: Any) -> dict[str, Any]:
        train = {k: getattr(args, k) for k in
                 ("backend", "factors", "regularization", "iterations", "alpha")
                 if getattr(args, k) is not None}
        settings = settings_from_args(args, train=train)
        spark = None
        if settings.train.backend == "mllib":
            from lake.spark_session import get_spark

            spark = get_spark(settings.spark)
        return run(settings, as_of=args.as_of, version=args.version, spark=spark)

    return run_main(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
