"""Compaction: bronze events -> silver events for a range of event dates.

Silver holds each event once (first arrival wins), validated and typed. The job rewrites
exactly the silver partitions `event_date` in `[start, end]`, so a rerun for the same
dates gives the same table, and a date whose bronze events are gone ends up empty.

Late events (a `ts` long before `received_at`) are kept: they live in the bronze
partition of their `ts` date, and the nightly DAG recompacts a trailing window of dates.

    python -m spark_jobs.compact --start 2026-11-01 --end 2026-11-21
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

from lake.config import EVENT_TYPES, Settings
from spark_jobs.cli import date_range, job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from lake.tables import Lake

REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts", "received_at")
ID_COLUMNS = ("event_id", "user_id", "item_id")
OUTPUT_COLUMNS = (
    "event_id", "user_id", "item_id", "event_type", "value", "ts", "received_at",
    "session_id", "properties", "event_date",
)
# First arrival wins; the remaining columns only break ties, so the result never depends
# on the order Spark happens to read the rows in.
TIE_BREAK = ("received_at", "ts", "user_id", "item_id", "event_type", "value", "session_id",
             "properties")


def compact_events(bronze: DataFrame) -> DataFrame:
    """Validate, type and de-duplicate raw events.

    Drops rows with a null or blank required field, an unknown `event_type`, or a
    non-finite `value` (NaN, +-inf; null stays allowed). Keeps one row per `event_id`:
    the earliest `received_at`, ties broken by the other columns. `event_type` is
    trimmed and lower-cased, `event_date` recomputed as the UTC date of `ts`.

    Args:
        bronze: DataFrame with the bronze event columns (extra columns are ignored).

    Returns:
        DataFrame with exactly the silver columns, in catalog order.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = bronze.select(
        *(F.col(c).cast("string").alias(c) for c in ID_COLUMNS),
        F.lower(F.trim(F.col("event_type").cast("string"))).alias("event_type"),
        F.col("value").cast("double").alias("value"),
        F.col("ts").cast("timestamp").alias("ts"),
        F.col("received_at").cast("timestamp").alias("received_at"),
        F.col("session_id").cast("string").alias("session_id"),
        F.col("properties").cast("string").alias("properties"),
    )
    valid = F.lit(True)
    for c in REQUIRED:
        valid = valid & F.col(c).isNotNull()
    for c in ID_COLUMNS:
        valid = valid & (F.length(F.trim(F.col(c))) > 0)
    valid = valid & F.col("event_type").isin(*EVENT_TYPES)
    finite = ~F.isnan(F.col("value")) & (F.abs(F.col("value")) != float("inf"))
    valid = valid & (F.col("value").isNull() | finite)
    df = df.where(valid)

    order = [F.col(c).asc_nulls_last() for c in TIE_BREAK]
    w = Window.partitionBy("event_id").orderBy(*order)
    return (
        df.withColumn("_rank", F.row_number().over(w))
        .where(F.col("_rank") == 1)
        .drop("_rank")
        # The session time zone is UTC (lake.spark_session), so this is the UTC date.
        .withColumn("event_date", F.to_date(F.col("ts")))
        .select(*OUTPUT_COLUMNS)
    )


def logged_rows(lake: Lake, name: str, start: date, end: date) -> int | None:
    """Rows in `event_date` partitions `start..end` from the Delta log's file statistics.

    None when some file in range carries no record count (then Spark has to count).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists(name):
        return 0
    actions = pa.table(lake.delta(name).get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    d = actions.column("partition.event_date")
    mask = pc.and_(pc.greater_equal(d, pa.scalar(start, d.type)),
                   pc.less_equal(d, pa.scalar(end, d.type)))
    counts = actions.filter(mask).column("num_records")
    if counts.null_count:
        return None
    return int(pc.sum(counts).as_py() or 0)


def run(
    settings: Settings,
    *,
    start: date,
    end: date,
    spark: SparkSession | None = None,
) -> dict[str, Any]:
    """Compact bronze into silver for event dates `start..end` (both included).

    Returns:
        `{"job", "start", "end", "dates", "bronze_rows", "silver_rows", "dropped",
        "silver_version", "seconds"}`.
    """
    from pyspark.sql import functions as F

    from lake.spark_bridge import read_table, write_table
    from lake.spark_session import get_spark
    from lake.tables import Lake

    t0 = time.perf_counter()
    dates = date_range(start, end)
    spark = spark or get_spark(settings.spark)
    lake = Lake.from_settings(settings.lake)
    lake.ensure("bronze_events")
    lake.ensure("silver_events")
    in_range = (F.col("event_date") >= F.lit(start)) & (F.col("event_date") <= F.lit(end))
    bronze = read_table(
        spark, lake, "bronze_events",
        partition_filter=f"event_date >= '{start.isoformat()}' AND "
                         f"event_date <= '{end.isoformat()}'",
    ).where(in_range)
    # event_date is recomputed from ts: keep only rows that belong to the rewritten range.
    silver = compact_events(bronze).where(in_range)
    # one file per event date (not one per date and shuffle partition), rows in a stable order
    out = silver.repartition("event_date").sortWithinPartitions("event_date", "ts", "event_id")
    version = write_table(out, lake, "silver_events", mode="overwrite",
                          partitions=[{"event_date": d} for d in dates])
    # Row counts from the Delta log (file statistics): no second pass over the data.
    n_bronze = logged_rows(lake, "bronze_events", start, end)
    if n_bronze is None:
        n_bronze = bronze.count()
    n_silver = logged_rows(lake, "silver_events", start, end)
    if n_silver is None:
        n_silver = read_table(spark, lake, "silver_events", version).where(in_range).count()
    return {
        "job": "compact",
        "start": start,
        "end": end,
        "dates": len(dates),
        "bronze_rows": int(n_bronze),
        "silver_rows": int(n_silver),
        "dropped": int(n_bronze) - int(n_silver),
        "silver_version": version,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.compact", "Compact bronze events into silver for a date range.")
    parser.add_argument("--start", type=parse_date, required=True, help="first event date")
    parser.add_argument("--end", type=parse_date, required=True, help="last event date (included)")

    def body(args: Any) -> dict[str, Any]:
        settings = settings_from_args(args)
        return run(settings, start=args.start, end=args.end)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
