"""Gold interactions: silver events -> one confidence per (user, item) as of a date.

    confidence(u, i) = min(max_confidence, sum_e weight(type_e) * 0.5 ** (age_e / half_life))

where `age_e` is the time in days from the event's `ts` to the end of the as-of day
(midnight UTC after it). Only events with `ts` before that instant and within
`lookback_days` of it count; event types of weight 0 are ignored. The job rewrites the
gold partition `as_of = D`, so reruns for a date replace it.

    python -m spark_jobs.interactions --as-of 2026-11-21
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import TYPE_CHECKING, Any

from lake.config import Settings
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

MICROS_PER_DAY = 86_400_000_000
OUTPUT_COLUMNS = ("user_id", "item_id", "confidence", "n_events", "last_ts", "as_of")


def end_of_day(d: date) -> datetime:
    """The first instant after `d` (midnight UTC of the next day)."""
    return datetime.combine(d + timedelta(days=1), dtime.min, tzinfo=UTC)


def build_interactions(
    events: DataFrame,
    *,
    weights: Mapping[str, float],
    half_life_days: float,
    as_of: date,
    max_confidence: float,
    lookback_days: int,
) -> DataFrame:
    """Aggregate events into time-decayed, weighted, capped confidences.

    Args:
        events: silver events (needs `user_id`, `item_id`, `event_type`, `ts`).
        weights: weight per event type; types missing or weighted 0 are ignored.
        half_life_days: an event this many days old counts half.
        as_of: events up to the end of this (UTC) day count; ages are measured to it.
        max_confidence: upper cap of a pair's confidence.
        lookback_days: events older than this many days before the end of `as_of` are
            ignored.

    Returns:
        `user_id, item_id, confidence (double), n_events (long, contributing events),
        last_ts (latest contributing ts), as_of (date)`.
    """
    from pyspark.sql import functions as F

    if half_life_days <= 0:
        raise JobError(f"half_life_days must be > 0, got {half_life_days}")
    if max_confidence <= 0:
        raise JobError(f"max_confidence must be > 0, got {max_confidence}")
    if lookback_days < 1:
        raise JobError(f"lookback_days must be >= 1, got {lookback_days}")
    active = {t: float(w) for t, w in weights.items() if w > 0}
    if not active:
        raise JobError("every event type has weight 0: no interactions can be built")

    end = end_of_day(as_of)
    end_us = int((end - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    start_us = end_us - lookback_days * MICROS_PER_DAY

    weight = F.create_map(*[x for t, w in sorted(active.items()) for x in (F.lit(t), F.lit(w))])
    ts_us = F.unix_micros(F.col("ts"))
    age_days = (F.lit(end_us) - ts_us).cast("double") / F.lit(float(MICROS_PER_DAY))
    scored = (
        events.where(F.col("event_type").isin(*active) & F.col("ts").isNotNull())
        .where((ts_us < F.lit(end_us)) & (ts_us >= F.lit(start_us)))
        .select(
            "user_id",
            "item_id",
            "ts",
            (weight[F.col("event_type")]
             * F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days)))).alias("score"),
        )
    )
    return (
        scored.groupBy("user_id", "item_id")
        .agg(
            F.sum("score").alias("confidence"),
            F.count(F.lit(1)).alias("n_events"),
            F.max("ts").alias("last_ts"),
        )
        .select(
            "user_id",
            "item_id",
            F.least(F.col("confidence"), F.lit(float(max_confidence))).alias("confidence"),
            F.col("n_events").cast("long").alias("n_events"),
            "last_ts",
            F.lit(as_of).cast("date").alias("as_of"),
        )
    )


def run(settings: Settings, *, as_of: date, spark: SparkSession | None = None) -> dict[str, Any]:
    """Rebuild gold partition `as_of` from silver.

    Returns:
        `{"job", "as_of", "events", "pairs", "users", "items", "gold_version", "seconds"}`.
    """
    from pyspark.sql import functions as F

    from lake.spark_bridge import read_table, write_table
    from lake.spark_session import get_spark
    from lake.tables import Lake

    t0 = time.perf_counter()
    cfg = settings.interactions
    spark = spark or get_spark(settings.spark)
    lake = Lake.from_settings(settings.lake)
    lake.ensure("silver_events")
    lake.ensure("gold_interactions")
    first = as_of - timedelta(days=cfg.lookback_days)
    # Partition pruning by event_date (= UTC date of ts); exact bounds are applied on ts.
    events = read_table(
        spark, lake, "silver_events",
        partition_filter=f"event_date >= '{first.isoformat()}' AND "
                         f"event_date <= '{as_of.isoformat()}'",
    )
    gold = build_interactions(
        events,
        weights=cfg.weights,
        half_life_days=cfg.half_life_days,
        as_of=as_of,
        max_confidence=cfg.max_confidence,
        lookback_days=cfg.lookback_days,
    ).cache()
    try:
        stats = gold.agg(
            F.count(F.lit(1)).alias("pairs"),
            F.coalesce(F.sum("n_events"), F.lit(0)).alias("events"),
            F.countDistinct("user_id").alias("users"),
            F.countDistinct("item_id").alias("items"),
        ).first()
        if stats is None:  # an aggregate without grouping always has one row
            raise RuntimeError("aggregate returned no row")
        # gold is one partition: a few files rather than one per shuffle partition
        files = max(1, min(settings.spark.shuffle_partitions, int(stats["pairs"]) // 1_000_000 + 1))
        out = gold.coalesce(files).sortWithinPartitions("user_id", "item_id")
        version = write_table(out, lake, "gold_interactions", mode="overwrite",
                              partitions=[{"as_of": as_of}])
    finally:
        gold.unpersist()
    return {
        "job": "interactions",
        "as_of": as_of,
        "events": int(stats["events"]),
        "pairs": int(stats["pairs"]),
        "users": int(stats["users"]),
        "items": int(stats["items"]),
        "gold_version": version,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.interactions",
                        "Build gold interactions (confidence per user and item) as of a date.")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, required=True,
                        help="as-of date: events up to the end of this UTC day count")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), as_of=args.as_of)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
