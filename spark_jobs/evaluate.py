"""Batch job: evaluate a staged model's recipe against baselines on a held-out split.

    python -m spark_jobs.evaluate --as-of 2024-01-31 --version v20240131

1. Load the staged model (`spark_jobs.staging`) for its backend and hyper-parameters.
2. Build the split from the lake (`evaluate.split`):
   * `random` — gold partition `as_of`, per-user holdout of `test_fraction` of each
     user's items (seeded with `train.seed`; `spark_jobs.splits.random_split`).
   * `time` — the test period is the last `holdout_days` days up to the end of `as_of`,
     i.e. timestamps >= cut-off = midnight UTC starting day `as_of - holdout_days + 1`.
     Gold keeps, per (user, item), the time of the latest contributing event (`last_ts`),
     so:
       - when gold has the partition `as_of - holdout_days` (the nightly pipeline's state
         at the cut-off — exactly the events before it), train = that partition and
         test = pairs of gold@as_of with last_ts >= cut-off that it does not contain
         (items first interacted with after the cut-off; exact);
       - otherwise train = rows of gold@as_of with last_ts < cut-off (all their events
         precede the cut-off, so nothing leaks) and test = rows with last_ts >= cut-off
         (items re-touched in the holdout then count as "new" for the user — the one
         approximation, stated in the report).
     Only users and items known at training time are evaluated (cold ones are counted).
3. Train the same backend with the same parameters on the train part.
4. Rank ALL items for each test user (training items excluded), for ALS, popularity and
   EASE (skipped above `ease_max_items`), on the same users; at most `max_eval_users`
   (seeded sample).
5. Write `<models>/reports/<version>/report.md` + PNG plots and
   `<models>/staging/<version>/metrics.json` (shape documented in `spark_jobs.staging`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from lake.config import Settings, TrainSettings
from lake.tables import Lake
from spark_jobs.als import make_trainer
from spark_jobs.baselines import ease_scorer, factor_scorer, popularity, popularity_scorer
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args
from spark_jobs.matrix import (
    GOLD,
    InteractionMatrix,
    build_matrix,
    gold_as_of_dates,
    read_gold,
    read_gold_batches,
)
from spark_jobs.metrics import RankingResult, evaluate_ranking, popularity_deciles
from spark_jobs.splits import random_split
from spark_jobs.staging import load_staged, save_metrics

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

REPORTS = "reports"
TIME_COLUMNS = ("user_id", "item_id", "confidence", "last_ts")


@dataclass
class EvalData:
    """A train matrix (with its id maps) and the test items in the same index space."""

    train: InteractionMatrix
    test: sp.csr_matrix
    protocol: str
    info: dict[str, Any] = field(default_factory=dict)


# -- splits -------------------------------------------------------------------------------
def split_random(matrix: InteractionMatrix, test_fraction: float, seed: int) -> EvalData:
    s = random_split(matrix.csr, test_fraction, seed)
    train = InteractionMatrix(matrix.user_ids, matrix.item_ids, s.train)
    return EvalData(train, s.test, "random", dict(s.info))


def cutoff_for(as_of: date, holdout_days: int) -> datetime:
    """Start (UTC midnight) of the test period: the last `holdout_days` days up to `as_of`."""
    first_test_day = as_of - timedelta(days=holdout_days - 1)
    return datetime(first_test_day.year, first_test_day.month, first_test_day.day, tzinfo=UTC)


def split_time(current: pa.Table, cutoff: datetime, prior: pa.Table | None = None) -> EvalData:
    """Time holdout from gold rows (user_id, item_id, confidence, last_ts).

    Args:
        current: gold rows as of the evaluation date.
        cutoff: first instant of the test period.
        prior: gold rows as of the cut-off (the state before it), when available.
    """
    ts = pc.cast(current.column("last_ts"), pa.timestamp("us", tz="UTC"))
    cut = pa.scalar(cutoff, pa.timestamp("us", tz="UTC"))
    after = current.filter(pc.greater_equal(ts, cut))
    if prior is not None:
        train_rows = prior
        known = prior.select(["user_id", "item_id"])
        test_rows = after.select(["user_id", "item_id"]).join(
            known, keys=["user_id", "item_id"], join_type="left anti"
        )
        exact = True
    else:
        train_rows = current.filter(pc.less(ts, cut))
        test_rows = after.select(["user_id", "item_id"])
        exact = False
    train = build_matrix([train_rows.select(["user_id", "item_id", "confidence"])])
    u = train.user_index(test_rows.column("user_id").to_numpy(zero_copy_only=False))
    i = train.item_index(test_rows.column("item_id").to_numpy(zero_copy_only=False))
    keep = (u >= 0) & (i >= 0)
    test = sp.csr_matrix((np.ones(int(keep.sum())), (u[keep], i[keep])), shape=train.shape)
    test.sum_duplicates()
    test.data[:] = 1.0
    # an item the user already has in train is no test item
    overlap = test.multiply(train.csr > 0)
    if overlap.nnz:
        test = (test - overlap).tocsr()
        test.eliminate_zeros()
    info = {
        "cutoff": cutoff.isoformat(),
        "exact": exact,
        "test_pairs_total": int(test_rows.num_rows),
        "test_pairs_cold_user": int(np.count_nonzero(u < 0)),
        "test_pairs_cold_item": int(np.count_nonzero((u >= 0) & (i < 0))),
        "test_users_cold": int(len(np.unique(
            test_rows.column("user_id").to_numpy(zero_copy_only=False)[u < 0]))),
    }
    return EvalData(train, test, "time", info)


def _gold_table(
    lake: Lake, as_of: date, columns: Sequence[str], version: int | None
) -> pa.Table:
    batches = list(read_gold_batches(lake, as_of, columns=columns, version=version))
    if batches:
        return pa.Table.from_batches(batches)
    schema = pa.schema(lake.delta(GOLD, version).schema().to_arrow())
    return pa.schema([schema.field(c) for c in columns]).empty_table()


def split_from_lake(
    lake: Lake, as_of: date, settings: Settings, *, gold_version: int | None = None
) -> EvalData:
    ev = settings.evaluate
    if ev.split == "random":
        matrix = read_gold(lake, as_of, version=gold_version)
        if matrix.nnz == 0:
            raise JobError(f"gold_interactions has no rows for as_of={as_of}")
        return split_random(matrix, ev.test_fraction, settings.train.seed)
    cutoff = cutoff_for(as_of, ev.holdout_days)
    current = _gold_table(lake, as_of, TIME_COLUMNS, gold_version)
    if current.num_rows == 0:
        raise JobError(f"gold_interactions has no rows for as_of={as_of}")
    prior_date = as_of - timedelta(days=ev.holdout_days)
    prior = None
    if prior_date in gold_as_of_dates(lake):
        prior = _gold_table(lake, prior_date, ("user_id", "item_id", "confidence"),
                            gold_version)
        if prior.num_rows == 0:
            prior = None
    data = split_time(current, cutoff, prior)
    data.info["prior_as_of"] = prior_date.isoformat() if prior is not None else None
    if data.train.nnz == 0:
        raise JobError(f"time split at {cutoff.isoformat()} leaves no training interactions; "
                       "lower evaluate.holdout_days or use evaluate.split=random")
    return data


# -- evaluation ---------------------------------------------------------------------------
def eval_users(test: sp.csr_matrix, max_users: int, seed: int) -> np.ndarray:
    users = np.flatnonzero(np.diff(sp.csr_matrix(test).indptr) > 0)
    if len(users) > max_users:
        rng = np.random.default_rng(seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    return users


def evaluate_models(
    data: EvalData,
    train_settings: TrainSettings,
    ks: Sequence[int],
    *,
    ease_max_items: int,
    ease_lambda: float,
    max_eval_users: int,
    spark: SparkSession | None = None,
) -> tuple[dict[str, RankingResult], dict[str, Any]]:
    """Train ALS on `data.train`, score ALS + baselines on the same users.

    Returns per-model results and run facts (fit seconds, skipped baselines...).
    """
    train = data.train.csr
    users = eval_users(data.test, max_eval_users, train_settings.seed)
    if len(users) == 0:
        raise JobError("the split has no test users known at training time")
    facts: dict[str, Any] = {"n_test_users": int(len(users))}
    results: dict[str, RankingResult] = {}
    t = time.perf_counter()
    fitted = make_trainer(train_settings, spark).fit(data.train)
    facts["als_fit_seconds"] = round(time.perf_counter() - t, 3)
    facts["als_info"] = fitted.info
    batch = max(64, min(2048, 20_000_000 // max(1, train.shape[1])))
    t = time.perf_counter()
    results["als"] = evaluate_ranking(factor_scorer(fitted.user_factors, fitted.item_factors),
                                      train, data.test, ks, users=users, batch_size=batch)
    facts["als_eval_seconds"] = round(time.perf_counter() - t, 3)
    results["popularity"] = evaluate_ranking(popularity_scorer(train), train, data.test, ks,
                                             users=users, batch_size=batch)
    if train.shape[1] <= ease_max_items:
        t = time.perf_counter()
        scorer = ease_scorer(train, ease_lambda)
        facts["ease_fit_seconds"] = round(time.perf_counter() - t, 3)
        results["ease"] = evaluate_ranking(scorer, train, data.test, ks, users=users,
                                           batch_size=batch)
    else:
        facts["ease_skipped"] = f"{train.shape[1]} items > ease_max_items={ease_max_items}"
    return results, facts


# -- report -------------------------------------------------------------------------------
def write_report(
    out_dir: Path,
    *,
    version: str,
    as_of: date | None,
    data: EvalData,
    results: dict[str, RankingResult],
    facts: dict[str, Any],
    params: dict[str, Any],
    ks: Sequence[int],
) -> Path:
    """report.md + metrics_vs_k.png + popularity_deciles.png under `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted(ks)
    names = list(results)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric in zip(axes, ("ndcg", "recall", "map", "coverage"), strict=True):
        for n in names:
            ax.plot(ks, [results[n].metrics[f"{metric}@{k}"] for k in ks], marker="o", label=n)
        ax.set_xlabel("k")
        ax.set_title(f"{metric}@k")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "metrics_vs_k.png", dpi=90)
    plt.close(fig)

    pop = popularity(data.train.csr)
    k_plot = 10 if 10 in ks else ks[0]
    deciles = {n: popularity_deciles(results[n].rec_counts[k_plot], pop) for n in names}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        ax.bar(np.arange(10) + j * width, deciles[n], width=width, label=n)
    ax.set_xticks(np.arange(10) + 0.4 - width / 2, [f"{10 * d}-{10 * d + 10}%" for d in range(10)],
                  rotation=45, fontsize=8)
    ax.set_xlabel("item popularity decile (most popular first)")
    ax.set_ylabel(f"share of top-{k_plot} recommendations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "popularity_deciles.png", dpi=90)
    plt.close(fig)

    lines = [
        f"# Evaluation report — model `{version}`",
        "",
        f"- as-of: {as_of}",
        f"- split: **{data.protocol}** {data.info}",
        f"- train: {data.train.shape[0]} users x {data.train.shape[1]} items, "
        f"{data.train.nnz} interactions; test: {int(data.test.nnz)} held-out pairs",
        f"- evaluated users: {facts['n_test_users']} (full ranking over all items, "
        "training items excluded)",
        f"- ALS params: {params}",
        f"- ALS fit: {facts.get('als_fit_seconds')} s ({facts.get('als_info', {}).get('device')})",
    ]
    if "ease_skipped" in facts:
        lines.append(f"- EASE skipped: {facts['ease_skipped']}")
    if data.protocol == "time" and not data.info.get("exact", True):
        lines.append("- note: no gold snapshot at the cut-off; items re-touched in the holdout "
                     "count as new for the user")
    lines += ["", "## Metrics", ""]
    cols = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "map", "coverage")]
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[n].metrics[c]:.4f}" for c in cols) + " |")
    lines += ["", "![metrics vs k](metrics_vs_k.png)", "",
              f"## Popularity of recommended items (top-{k_plot})", "",
              "| model | " + " | ".join(f"d{d + 1}" for d in range(10)) + " |",
              "|---|" + "---|" * 10]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in deciles[n]) + " |")
    lines += ["", "![popularity deciles](popularity_deciles.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- job ----------------------------------------------------------------------------------
def run(
    settings: Settings, *, as_of: date, version: str, spark: SparkSession | None = None
) -> dict[str, Any]:
    """Evaluate staged model `version` (its backend + params) on a split of gold@as_of.

    Returns:
        `{"job", "version", "split", "n_test_users", "ndcg@10": {model: value}, "metrics",
        "report", "seconds"}`; also writes metrics.json next to the staged model.
    """
    t0 = time.perf_counter()
    staged = load_staged(settings.model.dir, version)
    train_settings = settings.train.model_copy(
        update={k: v for k, v in staged.params.items() if k in TrainSettings.model_fields}
    )
    lake = Lake.from_settings(settings.lake)
    if not lake.exists(GOLD):
        raise JobError(f"gold_interactions does not exist under {lake.root}")
    gold_version = staged.info.get("gold_version")
    data = split_from_lake(lake, as_of, settings, gold_version=gold_version)
    ev = settings.evaluate
    results, facts = evaluate_models(
        data, train_settings, ev.k, ease_max_items=ev.ease_max_items,
        ease_lambda=ev.ease_lambda, max_eval_users=ev.max_eval_users, spark=spark,
    )
    report = write_report(
        Path(settings.model.dir) / REPORTS / version, version=version, as_of=as_of, data=data,
        results=results, facts=facts, params=staged.params, ks=ev.k,
    )
    metrics = {
        "split": data.protocol,
        "k": sorted(ev.k),
        "n_test_users": facts["n_test_users"],
        "models": {n: r.metrics for n, r in results.items()},
        "report": str(report),
        "split_info": data.info,
        "facts": facts,
    }
    save_metrics(settings.model.dir, version, metrics)
    headline = f"ndcg@{10 if 10 in ev.k else sorted(ev.k)[0]}"
    return {
        "job": "evaluate",
        "version": version,
        "split": data.protocol,
        "n_test_users": facts["n_test_users"],
        headline: {n: round(r.metrics[headline], 4) for n, r in results.items()},
        "report": str(report),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = job_parser("spark_jobs.evaluate",
                   "Evaluate a staged model against popularity and EASE on a holdout split.")
    p.add_argument("--as-of", dest="as_of", type=parse_date, required=True)
    p.add_argument("--version", required=True, help="staged model version")
    p.add_argument("--split", choices=["time", "random"], default=None)
    p.add_argument("--holdout-days", dest="holdout_days", type=int, default=None)
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=None)

    def body(args: Any) -> dict[str, Any]:
        ev = {k: getattr(args, k) for k in ("split", "holdout_days", "test_fraction")
              if getattr(args, k) is not None}
        settings = settings_from_args(args, evaluate=ev)
        spark = None
        from spark_jobs.staging import load_staged as _load

        if _load(settings.model.dir, args.version).backend == "mllib":
            from lake.spark_session import get_spark

            spark = get_spark(settings.spark)
        return run(settings, as_of=args.as_of, version=args.version, spark=spark)

    return run_main(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
