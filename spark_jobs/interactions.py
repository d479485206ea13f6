"""Gold interactions: silver events -> one strength per (user, item) as of a date.

    confidence(u, i) = min(max_confidence, sum_e strength(e))

with `strength` the one definition in `lake.strength` (type weight x value transform x
decay from the user's latest event), applied to Arrow batches inside Spark
(`mapInArrow`) or, on the Arrow engine (`spark_jobs.engine`), to the whole table, so the
gold table, the tuning search and the online layer agree on every event's strength.
Only events with `ts` before the end of the as-of day (midnight UTC after it) and
within `lookback_days` of it count; event types of weight 0 are ignored. The strength
settings are the tuned recipe of `--version` when its search ran (`spark_jobs.tune`), else
the configured ones. The job rewrites the gold partition `as_of = D`, so reruns for a date
replace it.

Like compaction, the job has a Spark form (`build_interactions`) and an Arrow form
(`build_interactions_arrow`), picked per run by `spark_jobs.engine`.

A rerun with nothing new reuses the partition: its commit records (a Delta application
transaction per as-of date) a fingerprint of what it was built from (the silver version,
the strength settings, the lookback), and a run that finds the same fingerprint only reads
the partition's counts. `--rebuild` rebuilds regardless.

    python -m spark_jobs.interactions --as-of 2026-11-21 [--version v20261121-ab12]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from lake.config import Settings
from lake.strength import StrengthParams, score_batch
from lake.training_cut import end_of_day
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

    from lake.tables import Lake

MICROS_PER_DAY = 86_400_000_000
OUTPUT_COLUMNS = ("user_id", "item_id", "confidence", "n_events", "last_ts", "as_of")


def build_interactions(
    events: DataFrame,
    *,
    params: StrengthParams,
    as_of: date,
    lookback_days: int,
) -> DataFrame:
    """Aggregate events into strengths per (user, item) (`lake.strength`).

    Args:
        events: silver events (needs `user_id`, `item_id`, `event_type`, `value`, `ts`).
        params: the strength definition's settings.
        as_of: events up to the end of this (UTC) day count.
        lookback_days: events older than this many days before the end of `as_of` are
            ignored.

    Returns:
        `user_id, item_id, confidence (double), n_events (long, contributing events),
        last_ts (latest contributing ts), as_of (date)`.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    active, start_us, end_us = event_window(params, as_of, lookback_days)
    ts_us = F.unix_micros(F.col("ts"))
    kept = (
        events.where(F.col("event_type").isin(*active) & F.col("ts").isNotNull())
        .where((ts_us < F.lit(end_us)) & (ts_us >= F.lit(start_us)))
        .select("user_id", "item_id", "event_type", F.col("value").cast("double"), "ts")
        .withColumn("ref_ts", F.max("ts").over(Window.partitionBy("user_id")))
    )
    schema = T.StructType(kept.schema.fields + [T.StructField("score", T.DoubleType())])

    def strengths(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            yield score_batch(b, params)

    scored = kept.mapInArrow(strengths, schema)
    return (
        scored.groupBy("user_id", "item_id")
        .agg(
            F.sum("score").alias("confidence"),
            F.count(F.lit(1)).alias("n_events"),
            F.max("ts").alias("last_ts"),
        )
        .where(F.col("confidence") > 0)
        .select(
            "user_id",
            "item_id",
            F.least(F.col("confidence"), F.lit(float(params.max_confidence))).alias("confidence"),
            F.col("n_events").cast("long").alias("n_events"),
            "last_ts",
            F.lit(as_of).cast("date").alias("as_of"),
        )
    )


def event_window(params: StrengthParams, as_of: date,
                 lookback_days: int) -> tuple[list[str], int, int]:
    """The event types that count and the `ts` window [start, end) in epoch microseconds."""
    if lookback_days < 1:
        raise JobError(f"lookback_days must be >= 1, got {lookback_days}")
    active = params.active_types
    if not active:
        raise JobError("every event type has weight 0: no interactions can be built")
    end = end_of_day(as_of)
    end_us = int((end - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    return active, end_us - lookback_days * MICROS_PER_DAY, end_us


def build_interactions_arrow(events: pa.Table, *, params: StrengthParams, as_of: date,
                             lookback_days: int) -> pa.Table:
    """`build_interactions` on an Arrow table (the Arrow engine, `spark_jobs.engine`): the
    same rules and columns, rows sorted by `user_id, item_id`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    active, start_us, end_us = event_window(params, as_of, lookback_days)
    ts_us = pc.cast(pc.cast(events["ts"], pa.timestamp("us", tz="UTC")), pa.int64())
    keep = pc.and_kleene(pc.is_in(events["event_type"], pa.array(active, pa.string())),
                         pc.and_kleene(pc.less(ts_us, end_us),
                                       pc.greater_equal(ts_us, start_us)))
    kept = pa.table({
        "user_id": events["user_id"], "item_id": events["item_id"],
        "event_type": events["event_type"], "value": pc.cast(events["value"], pa.float64()),
        "ts": events["ts"],
    }).filter(pc.fill_null(keep, False))
    ref = kept.group_by("user_id").aggregate([("ts", "max")]).rename_columns(
        ["user_id", "ref_ts"])
    scored = score_batch(kept.join(ref, "user_id"), params)
    g = scored.group_by(["user_id", "item_id"]).aggregate(
        [("score", "sum"), ("score", "count"), ("ts", "max")])
    g = g.filter(pc.greater(g["score_sum"], 0.0))
    out = pa.table({
        "user_id": g["user_id"], "item_id": g["item_id"],
        "confidence": pc.min_element_wise(g["score_sum"], float(params.max_confidence)),
        "n_events": pc.cast(g["score_count"], pa.int64()),
        "last_ts": g["ts_max"],
        "as_of": pa.array([as_of] * g.num_rows, pa.date32()),
    })
    return out.take(pc.sort_indices(out, [("user_id", "ascending"), ("item_id", "ascending")]))


def build_fingerprint(silver_version: int, params: StrengthParams, lookback_days: int) -> int:
    """What a gold partition was built from, as a positive int64 (a Delta application
    transaction holds an integer)."""
    key = json.dumps([silver_version, params.to_dict(), lookback_days], sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


def gold_app_id(as_of: date) -> str:
    return f"lambdarec.gold.{as_of.isoformat()}"


def partition_counts(lake: Any, as_of: date) -> dict[str, int]:
    """Pairs, events, users and items of gold partition `as_of`, read with delta-rs."""
    import pyarrow.compute as pc

    t = lake.delta("gold_interactions").to_pyarrow_dataset().to_table(
        filter=pc.field("as_of") == as_of, columns=["user_id", "item_id", "n_events"])
    return {"events": int(pc.sum(t["n_events"]).as_py() or 0), "pairs": t.num_rows,
            "users": len(pc.unique(t["user_id"])), "items": len(pc.unique(t["item_id"]))}


def run(settings: Settings, *, as_of: date, spark: SparkSession | None = None,
        version: str | None = None, rebuild: bool = False) -> dict[str, Any]:
    """Rebuild gold partition `as_of` from silver, unless it was built from the same inputs.

    Returns:
        `{"job", "as_of", "engine", "events", "pairs", "users", "items", "gold_version",
        "reused", "seconds"}` (no `engine` when the partition was reused).
    """
    from lake.tables import Lake
    from spark_jobs.cli import date_range
    from spark_jobs.compact import logged_rows
    from spark_jobs.engine import choose_engine
    from spark_jobs.recipe import load_recipe

    t0 = time.perf_counter()
    cfg = settings.interactions
    lake = Lake.from_settings(settings.lake)
    lake.ensure("silver_events")
    lake.ensure("gold_interactions")
    params = load_recipe(settings, version).strength
    # The build reads this silver version, so the fingerprint names exactly its input.
    silver_version = lake.delta("silver_events").version()
    built_from = build_fingerprint(silver_version, params, cfg.lookback_days)
    current = lake.delta("gold_interactions")
    if not rebuild and current.transaction_version(gold_app_id(as_of)) == built_from:
        return {"job": "interactions", "as_of": as_of, **partition_counts(lake, as_of),
                "gold_version": current.version(), "reused": True,
                "seconds": round(time.perf_counter() - t0, 3)}
    first = as_of - timedelta(days=cfg.lookback_days)
    n_silver = logged_rows(lake, "silver_events", date_range(first, as_of), silver_version)
    engine = choose_engine(settings.spark, n_silver, spark)
    build = _build_arrow if engine == "arrow" else _build_spark
    stats, gold_version = build(settings, lake, silver_version, params, as_of,
                                (gold_app_id(as_of), built_from), spark)
    return {
        "job": "interactions",
        "as_of": as_of,
        "engine": engine,
        "events": int(stats["events"]),
        "pairs": int(stats["pairs"]),
        "users": int(stats["users"]),
        "items": int(stats["items"]),
        "gold_version": gold_version,
        "reused": False,
        "seconds": round(time.perf_counter() - t0, 3),
    }


Built = tuple[dict[str, int], int]
"""A gold build's counts (`pairs`, `events`, `users`, `items`) and the gold version."""


def _build_spark(settings: Settings, lake: Lake, silver_version: int, params: StrengthParams,
                 as_of: date, record: tuple[str, int], spark: SparkSession | None) -> Built:
    from pyspark.sql import functions as F

    from lake.spark_bridge import read_table, write_table
    from lake.spark_session import get_spark

    spark = spark or get_spark(settings.spark)
    first = as_of - timedelta(days=settings.interactions.lookback_days)
    # Partition pruning by event_date (= UTC date of ts); exact bounds are applied on ts.
    events = read_table(
        spark, lake, "silver_events", silver_version,
        partition_filter=f"event_date >= '{first.isoformat()}' AND "
                         f"event_date <= '{as_of.isoformat()}'",
    )
    gold = build_interactions(
        events, params=params, as_of=as_of, lookback_days=settings.interactions.lookback_days,
    ).cache()
    try:
        row = gold.agg(
            F.count(F.lit(1)).alias("pairs"),
            F.coalesce(F.sum("n_events"), F.lit(0)).alias("events"),
            F.countDistinct("user_id").alias("users"),
            F.countDistinct("item_id").alias("items"),
        ).first()
        if row is None:  # an aggregate without grouping always has one row
            raise RuntimeError("aggregate returned no row")
        stats = {k: int(row[k]) for k in ("pairs", "events", "users", "items")}
        # gold is one partition: a few files rather than one per shuffle partition
        files = max(1, min(settings.spark.shuffle_partitions, stats["pairs"] // 1_000_000 + 1))
        out = gold.coalesce(files).sortWithinPartitions("user_id", "item_id")
        version = write_table(out, lake, "gold_interactions", mode="overwrite",
                              partitions=[{"as_of": as_of}], app_transaction=record)
    finally:
        gold.unpersist()
    return stats, version


def _build_arrow(settings: Settings, lake: Lake, silver_version: int, params: StrengthParams,
                 as_of: date, record: tuple[str, int], spark: SparkSession | None) -> Built:
    import pyarrow.compute as pc

    from lake.spark_bridge import write_table
    from spark_jobs.event_log import silver_window

    first = as_of - timedelta(days=settings.interactions.lookback_days)
    events = silver_window(lake, first, as_of, version=silver_version)
    gold = build_interactions_arrow(events, params=params, as_of=as_of,
                                    lookback_days=settings.interactions.lookback_days)
    stats = {"pairs": gold.num_rows, "events": int(pc.sum(gold["n_events"]).as_py() or 0),
             "users": pc.count_distinct(gold["user_id"]).as_py(),
             "items": pc.count_distinct(gold["item_id"]).as_py()}
    version = write_table(gold, lake, "gold_interactions", mode="overwrite",
                          partitions=[{"as_of": as_of}], app_transaction=record)
    return stats, version


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.interactions",
                        "Build gold interactions (confidence per user and item) as of a date.")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, required=True,
                        help="as-of date: events up to the end of this UTC day count")

    parser.add_argument("--version", default=None,
                        help="model version whose tuned strength settings to apply")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the partition even when its inputs are unchanged")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), as_of=args.as_of, version=args.version,
                   rebuild=args.rebuild)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
