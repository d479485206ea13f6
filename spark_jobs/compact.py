"""Compaction: bronze events -> silver events, for the dates whose bronze rows changed.

Silver holds each event once (first arrival wins), validated and typed, partitioned by
`event_date`. An event is its (tenant, event_id): ids are unique per tenant (the access
key that sent it, `online.ingest`), so two tenants' events with the same id both stay.
The job rewrites whole silver partitions, so a rerun gives the same table and a date whose
bronze events are gone ends up empty.

By default the work is proportional to what changed, not to the history: silver records
(a Delta application transaction in the same commit) the bronze version it was compacted
from, and the next run rewrites only the event dates that bronze commits after that
version added or removed rows in (`lake.delta_log`). With no new events it does nothing.
The first run, or `--full`, rewrites every date. Late events (a `ts` long before
`received_at`) live in the bronze partition of their `ts` date, so the run after their
arrival rewrites that date, however old.

The rules are stated twice, as Spark columns (`compact_events`) and as Arrow compute
(`compact_events_arrow`); `spark_jobs.engine` picks one per run by the size of the input.

    python -m spark_jobs.compact                                       # changed dates
    python -m spark_jobs.compact --full                                # every date
    python -m spark_jobs.compact --start 2026-11-01 --end 2026-11-21   # exactly these
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

from lake.config import EVENT_TYPES, Settings
from spark_jobs.cli import (
    JobError,
    date_range,
    job_parser,
    parse_date,
    run_main,
    settings_from_args,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

    from lake.tables import Lake

REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts", "received_at")
ID_COLUMNS = ("event_id", "user_id", "item_id")
OUTPUT_COLUMNS = (
    "event_id", "user_id", "item_id", "event_type", "value", "ts", "received_at",
    "session_id", "properties", "event_date", "tenant", "recommendation_id",
)
EVENT_KEY = ("tenant", "event_id")
"""What identifies an event: its id within its tenant ("" for events without one)."""
# First arrival wins; the remaining columns only break ties, so the result never depends
# on the order Spark happens to read the rows in.
TIE_BREAK = ("received_at", "ts", "user_id", "item_id", "event_type", "value", "session_id",
             "properties", "recommendation_id")


def compact_events(bronze: DataFrame) -> DataFrame:
    """Validate, type and de-duplicate raw events.

    Drops rows with a null or blank required field, an unknown `event_type`, or a
    non-finite `value` (NaN, +-inf; null stays allowed). Keeps one row per `EVENT_KEY`
    (tenant, event_id): the earliest `received_at`, ties broken by the other columns.
    `event_type` is trimmed and lower-cased, `event_date` recomputed as the UTC date of
    `ts`, a null (or missing) `tenant` or `recommendation_id` is "" (bronze rows from
    before those columns).

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
        *((F.coalesce(F.col(c).cast("string"), F.lit("")) if c in bronze.columns
           else F.lit("")).alias(c) for c in ("tenant", "recommendation_id")),
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
    w = Window.partitionBy(*EVENT_KEY).orderBy(*order)
    return (
        df.withColumn("_rank", F.row_number().over(w))
        .where(F.col("_rank") == 1)
        .drop("_rank")
        # The session time zone is UTC (lake.spark_session), so this is the UTC date.
        .withColumn("event_date", F.to_date(F.col("ts")))
        .select(*OUTPUT_COLUMNS)
    )


def compact_events_arrow(bronze: pa.Table) -> pa.Table:
    """`compact_events` on an Arrow table (the Arrow engine, `spark_jobs.engine`): the
    same rules, row for row. Rows come out sorted by `event_date, ts, event_id, tenant`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from lake.schemas import SILVER_EVENTS

    types = SILVER_EVENTS.schema
    n = bronze.num_rows

    def text(c: str) -> pa.ChunkedArray | pa.Array:  # "" for rows from before the column
        col = bronze.column(c) if c in bronze.column_names else pa.nulls(n, pa.string())
        return pc.fill_null(pc.cast(col, pa.string()), "")

    t = pa.table({
        **{c: pc.cast(bronze.column(c), pa.string()) for c in ID_COLUMNS},
        # Spark's trim strips spaces only, not all whitespace
        "event_type": pc.utf8_lower(pc.utf8_trim(pc.cast(bronze.column("event_type"),
                                                         pa.string()), " ")),
        **{c: pc.cast(bronze.column(c), types.field(c).type)
           for c in ("value", "ts", "received_at", "session_id", "properties")},
        "tenant": text("tenant"),
        "recommendation_id": text("recommendation_id"),
    })
    valid = pc.is_in(t["event_type"], pa.array(EVENT_TYPES, pa.string()))
    for c in REQUIRED:
        valid = pc.and_kleene(valid, pc.is_valid(t[c]))
    for c in ID_COLUMNS:
        valid = pc.and_kleene(valid, pc.greater(pc.utf8_length(pc.utf8_trim(t[c], " ")), 0))
    finite = pc.and_(pc.invert(pc.is_nan(t["value"])),
                     pc.not_equal(pc.abs(t["value"]), float("inf")))
    valid = pc.and_kleene(valid, pc.or_kleene(pc.is_null(t["value"]), finite))
    t = t.filter(pc.fill_null(valid, False))
    # one row per (tenant, event_id): the first in (EVENT_KEY, TIE_BREAK) order, nulls last
    order = pc.sort_indices(t, [(c, "ascending", "at_end") for c in (*EVENT_KEY, *TIE_BREAK)])
    first = np.ones(len(order), bool)
    if len(order) > 1:
        first[1:] = False
        for c in EVENT_KEY:  # a row starts a new event where any key column changes
            col = t[c].take(order)
            first[1:] |= pc.not_equal(col.slice(1), col.slice(0, len(col) - 1)).to_numpy(
                zero_copy_only=False)
    t = t.take(pc.filter(order, pa.array(first)))
    t = t.append_column("event_date", pc.cast(t["ts"], pa.date32()))
    t = t.take(pc.sort_indices(t, [("event_date", "ascending"), ("ts", "ascending"),
                                   ("event_id", "ascending"), ("tenant", "ascending")]))
    return t.select(list(OUTPUT_COLUMNS))


WATERMARK_APP_ID = "lambdarec.compact.bronze_version"
"""Delta application transaction on silver: the bronze version its compaction has read."""


def logged_rows(lake: Lake, name: str, dates: Sequence[date],
                version: int | None = None) -> int | None:
    """Rows in the `event_date` partitions `dates` from the Delta log's file statistics.

    None when some file in range carries no record count (then Spark has to count).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists(name) or not dates:
        return 0
    actions = pa.table(lake.delta(name, version).get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    d = pc.cast(actions.column("partition.event_date"), pa.date32())
    counts = actions.filter(pc.is_in(d, pa.array(dates, pa.date32()))).column("num_records")
    if counts.null_count:
        return None
    return int(pc.sum(counts).as_py() or 0)


def partition_dates(lake: Lake, name: str, version: int | None = None) -> set[date]:
    """The `event_date` partitions holding files, from the Delta log alone."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists(name):
        return set()
    actions = pa.table(lake.delta(name, version).get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return set()
    col = pc.cast(actions.column("partition.event_date"), pa.date32())
    return {d for d in pc.unique(col).to_pylist() if d is not None}


def watermark(lake: Lake) -> int | None:
    """The bronze version silver was last compacted from (incrementally or in full)."""
    if not lake.exists("silver_events"):
        return None
    return lake.delta("silver_events").transaction_version(WATERMARK_APP_ID)


def plan_dates(lake: Lake, bronze_version: int, *, full: bool = False) -> tuple[str, list[date]]:
    """Which silver dates to rewrite so silver matches bronze at `bronze_version`.

    `incremental`: the event dates that bronze commits after the watermark changed (the
    Delta log says which; rewrites that keep rows, like `optimize.compact`, do not count).
    `full` (no watermark yet, a log that cannot tell, or asked for): every date bronze or
    silver holds.
    """
    from lake.delta_log import changed_partition_values

    mark = None if full else watermark(lake)
    if mark is not None and mark <= bronze_version:
        changed = changed_partition_values(lake.path("bronze_events"), mark, bronze_version,
                                           "event_date")
        if changed is not None:
            return "incremental", sorted(date.fromisoformat(v) for v in changed if v)
    dates = partition_dates(lake, "bronze_events", bronze_version) \
        | partition_dates(lake, "silver_events")
    return "full", sorted(dates)


def date_filter(dates: Sequence[date]) -> str:
    """A delta-rs partition predicate selecting exactly `dates` (a range when contiguous)."""
    if len(dates) == (dates[-1] - dates[0]).days + 1:
        return f"event_date >= '{dates[0].isoformat()}' AND event_date <= '{dates[-1].isoformat()}'"
    return "event_date IN (" + ", ".join(f"'{d.isoformat()}'" for d in dates) + ")"


def run(
    settings: Settings,
    *,
    start: date | None = None,
    end: date | None = None,
    full: bool = False,
    spark: SparkSession | None = None,
) -> dict[str, Any]:
    """Compact bronze into silver.

    With `start` and `end`: exactly the event dates `start..end` (both included). Without:
    the dates bronze commits changed since the last compaction (`full`: every date), and
    the bronze version read is recorded in the same silver commit for the next run.

    Returns:
        `{"job", "mode", "start", "end", "dates", "bronze_version", "engine", "bronze_rows",
        "silver_rows", "dropped", "silver_version", "seconds"}`; mode is `range`,
        `incremental` or `full`; engine `spark` or `arrow` (`spark_jobs.engine`; absent
        when there was nothing to do).
    """
    from lake.tables import Lake
    from spark_jobs.engine import choose_engine

    t0 = time.perf_counter()
    if (start is None) != (end is None):
        raise JobError("give both --start and --end, or neither (incremental)")
    lake = Lake.from_settings(settings.lake)
    lake.ensure("bronze_events")
    lake.ensure("silver_events")
    bronze_version = lake.version("bronze_events")
    record: tuple[str, int] | None = None
    if start is not None and end is not None:
        mode, dates = "range", date_range(start, end)
    else:
        mode, dates = plan_dates(lake, bronze_version, full=full)
        record = (WATERMARK_APP_ID, bronze_version)
    result: dict[str, Any] = {
        "job": "compact", "mode": mode, "start": dates[0] if dates else None,
        "end": dates[-1] if dates else None, "dates": len(dates),
        "bronze_version": bronze_version, "bronze_rows": 0, "silver_rows": 0, "dropped": 0,
        "silver_version": lake.version("silver_events"),
    }
    if not dates:  # nothing changed since the last compaction: no Spark job at all
        return result | {"seconds": round(time.perf_counter() - t0, 3)}
    # Row counts from the Delta log (file statistics): no extra pass over the data.
    n_bronze = logged_rows(lake, "bronze_events", dates, bronze_version)
    engine = choose_engine(settings.spark, n_bronze, spark)
    if engine == "arrow":
        version, read = _compact_arrow(lake, bronze_version, dates, record)
        n_bronze = read if n_bronze is None else n_bronze
    else:
        from pyspark.sql import functions as F

        from lake.spark_bridge import read_table, write_table
        from lake.spark_session import get_spark

        spark = spark or get_spark(settings.spark)
        in_dates = F.col("event_date").isin(*dates)
        bronze = read_table(spark, lake, "bronze_events", bronze_version,
                            partition_filter=date_filter(dates)).where(in_dates)
        # event_date is recomputed from ts: keep only rows that belong to the rewritten dates.
        silver = compact_events(bronze).where(in_dates)
        # one file per event date (not one per date and shuffle partition), rows in a stable
        # order
        out = silver.repartition("event_date").sortWithinPartitions("event_date", "ts",
                                                                    "event_id", "tenant")
        version = write_table(out, lake, "silver_events", mode="overwrite",
                              partitions=[{"event_date": d} for d in dates],
                              app_transaction=record)
        if n_bronze is None:
            n_bronze = bronze.count()
    n_silver = logged_rows(lake, "silver_events", dates, version)
    if n_silver is None:
        n_silver = lake.delta("silver_events", version).to_pyarrow_dataset().count_rows(
            filter=_in_dates(dates))
    return result | {
        "engine": engine,
        "bronze_rows": int(n_bronze),
        "silver_rows": int(n_silver),
        "dropped": int(n_bronze) - int(n_silver),
        "silver_version": version,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _in_dates(dates: Sequence[date]) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds

    return ds.field("event_date").isin(pa.array(dates, pa.date32()))


def _compact_arrow(lake: Lake, bronze_version: int, dates: Sequence[date],
                   record: tuple[str, int] | None) -> tuple[int, int]:
    """The Arrow engine's compaction of `dates`; returns the silver version and the
    number of bronze rows read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lake.spark_bridge import write_table

    # Lake.read: the catalog's columns (tenant "" for older files) and types
    bronze = lake.read("bronze_events", version=bronze_version, filters=_in_dates(dates))
    silver = compact_events_arrow(bronze)
    # event_date is recomputed from ts: keep only rows that belong to the rewritten dates
    silver = silver.filter(pc.is_in(silver["event_date"], pa.array(dates, pa.date32())))
    version = write_table(silver, lake, "silver_events", mode="overwrite",
                          partitions=[{"event_date": d} for d in dates], app_transaction=record)
    return version, bronze.num_rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.compact",
                        "Compact bronze events into silver: changed dates or a date range.")
    parser.add_argument("--start", type=parse_date, default=None,
                        help="first event date (with --end: exactly that range)")
    parser.add_argument("--end", type=parse_date, default=None,
                        help="last event date (included)")
    parser.add_argument("--full", action="store_true",
                        help="without --start/--end: every date, not only those changed "
                             "since the last compaction")

    def body(args: Any) -> dict[str, Any]:
        settings = settings_from_args(args)
        return run(settings, start=args.start, end=args.end, full=args.full)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
