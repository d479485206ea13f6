"""Attribution: which recommendation list earned each click, add-to-cart and purchase.

Reads `silver_events` (validated and de-duplicated per tenant, so a click a client resent
is counted once; the DAG compacts first), `bronze_impressions` (the lists the servers
showed) and `items` (prices); writes two gold tables.

**`gold_attributed_events`**, partitioned by `event_date`: each `click`, `add_to_cart` and
`purchase` event at most once, tied to one list by these rules, in this order:

1. *explicit*: the event carries a `recommendation_id`. It is attributed to that list when
   the list was shown to the same user and contained the event's item; otherwise the event
   stays **unattributed** (an id is a claim the shop makes; a wrong one is not replaced by
   a guess). Ids are looked up among lists shown up to `attribution.explicit_lookback_days`
   before the event's date; time order is not checked (the event's `ts` is the client's
   clock, the impression's the server's).
2. *window*: no `recommendation_id`: the **last** list (latest `ts`, ties broken by the
   larger `recommendation_id`) that showed the item to the user at most
   `attribution.window_hours` before the event: `event.ts - window <= impression.ts <=
   event.ts`, both ends included. None: unattributed.

The user is matched on `user_id` alone, not on the tenant (access key name): user ids are
global in the lake, as in training, and a shop may ask for lists with one key and send
events with another. Anonymous lists (SimilarItems without a viewer) match no event. An
item shown twice in one list counts at its first position. `revenue` = `items.price` x
quantity for purchases, quantity = the event's `value` when set and > 0, else 1 (the
catalogue's price when the job runs: the items table keeps no price history); null for
other events and for items without a price. Lists dropped by impression sampling
(`impressions.sample_rate`) cannot be found, so their events stay unattributed.

**`gold_recommendation_metrics`**, partitioned by `impression_date`: for the lists shown
that day, by `model_version`, `strategy`, `experiment_id`, `arm` (null as "") and
`position` (one row per position and one with position null for the whole list):

- `impressions`: lists (at a position: lists with an item there); `users`: distinct users
  shown them;
- `clicks` / `carts`: distinct (list, item) pairs clicked / put in the cart (a second click
  on the same item of the same list adds nothing); `purchases`: purchase events;
  `purchasers`: distinct users with one; `revenue`: their sum;
- `ctr` = clicks / impressions, `conversion` = purchasers / users, `revenue_per_user` =
  revenue / users.

Events count on the day their list was shown, so a day's figures settle once the window
has passed: a run for as-of date D rewrites the event dates and impression dates
`D - ceil(window_hours / 24) .. D`, which finalises the days before. `--start/--end`
rewrites exactly the given days (an explicit id older than the window counts in a day's
metrics once that day is rewritten after the event). A rerun overwrites exactly its own
partitions of both tables.

The rules are stated twice, as Arrow compute (`attribute_events_arrow`,
`recommendation_metrics_arrow`) and as Spark columns (`attribute_events`,
`recommendation_metrics`); `spark_jobs.engine` picks one per run by the input's size.

    python -m spark_jobs.attribution                                    # as-of yesterday
    python -m spark_jobs.attribution --as-of 2026-11-21
    python -m spark_jobs.attribution --start 2026-11-01 --end 2026-11-21
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from lake.config import Settings
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

ATTRIBUTED_TYPES = ("click", "add_to_cart", "purchase")
"""Event types the job attributes (views and ratings are not outcomes of a list)."""
LIST_KEYS = ("model_version", "strategy", "experiment_id", "arm")
"""What a list was served by; the metrics' grouping (with the day and the position)."""
OUTPUT_COLUMNS = (
    "event_id", "tenant", "user_id", "item_id", "event_type", "ts", "recommendation_id",
    "rule", "position", "model_version", "strategy", "experiment_id", "arm", "surface",
    "impression_ts", "revenue", "event_date",
)
METRIC_COLUMNS = (
    "impression_date", *LIST_KEYS, "position", "impressions", "users", "clicks", "carts",
    "purchases", "purchasers", "revenue", "ctr", "conversion", "revenue_per_user",
)
_US = 1_000_000


def window_days(window_hours: float) -> int:
    """Whole days a window of `window_hours` can reach back across (at least 1)."""
    return max(1, math.ceil(window_hours / 24))


# =========================================================================== Arrow engine


def _first_rows(t: pa.Table, keys: Sequence[str],
                order: Sequence[tuple[str, str]]) -> pa.Table:
    """One row per distinct `keys`: the first in `order` (nulls last)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if t.num_rows == 0:
        return t
    idx = pc.sort_indices(t, [(k, "ascending", "at_end") for k in keys]
                          + [(c, o, "at_end") for c, o in order])
    s = t.take(idx)
    first = np.zeros(s.num_rows, bool)
    first[0] = True
    for k in keys:  # a row starts a new group where any key column changes
        col = s[k]
        changed = pc.fill_null(pc.not_equal(col.slice(1), col.slice(0, s.num_rows - 1)), True)
        first[1:] |= changed.to_numpy(zero_copy_only=False)
    return s.filter(pa.array(first))


def _text(t: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    """Column `name` as strings with null (or a missing column) as ""."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in t.column_names:
        return pa.array([""] * t.num_rows, pa.string())
    return pc.fill_null(pc.cast(t[name], pa.string()), "")


def _shown_on(impressions: pa.Table) -> pa.ChunkedArray | pa.Array:
    """The day each list was shown: its partition `impression_date` (the UTC date of `ts`
    when the column is missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "impression_date" in impressions.column_names:
        return pc.cast(impressions["impression_date"], pa.date32())
    return pc.cast(impressions["ts"], pa.date32())


def explode_impressions_arrow(impressions: pa.Table) -> pa.Table:
    """One row per (list, item): `recommendation_id, item_id, position, imp_user_id,
    impression_ts, impression_date, surface` and the `LIST_KEYS` ("" for null); an item
    listed twice keeps its first position."""
    import pyarrow as pa
    import pyarrow.compute as pc

    items = impressions["items"].combine_chunks() if impressions.num_rows else \
        pa.array([], impressions.schema.field("items").type)
    flat = pc.list_flatten(items)
    parent = pc.list_parent_indices(items)
    base = impressions.take(parent)
    t = pa.table({
        "recommendation_id": pc.cast(base["recommendation_id"], pa.string()),
        "item_id": pc.cast(pc.struct_field(flat, "item_id"), pa.string()),
        "position": pc.cast(pc.struct_field(flat, "position"), pa.int32()),
        "imp_user_id": pc.cast(base["user_id"], pa.string()),
        "impression_ts": base["ts"],
        "impression_date": _shown_on(base),
        "surface": _text(base, "surface"),
        **{k: _text(base, k) for k in LIST_KEYS},
    })
    t = t.filter(pc.is_valid(t["item_id"]))
    return _first_rows(t, ("recommendation_id", "item_id"), [("position", "ascending")])


def prepare_events_arrow(events: pa.Table) -> pa.Table:
    """The events attribution looks at: clicks, carts and purchases, once per (tenant,
    event_id) (the first arrival, as compaction keeps), `recommendation_id` null as ""."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.table({
        "event_id": pc.cast(events["event_id"], pa.string()),
        "tenant": _text(events, "tenant"),
        "user_id": pc.cast(events["user_id"], pa.string()),
        "item_id": pc.cast(events["item_id"], pa.string()),
        "event_type": pc.cast(events["event_type"], pa.string()),
        "value": pc.cast(events["value"], pa.float64()),
        "ts": events["ts"],
        "received_at": events["received_at"] if "received_at" in events.column_names
        else events["ts"],
        "recommendation_id": _text(events, "recommendation_id"),
    })
    t = t.filter(pc.is_in(t["event_type"], pa.array(ATTRIBUTED_TYPES, pa.string())))
    return _first_rows(t, ("tenant", "event_id"), [("received_at", "ascending"),
                                                   ("ts", "ascending")])


def attribute_events_arrow(events: pa.Table, impressions: pa.Table, items: pa.Table, *,
                           window_hours: float) -> pa.Table:
    """Attribute events to lists (the rules of the module docstring), on Arrow tables.

    Args:
        events: silver-event columns (`recommendation_id` optional: absent means "").
        impressions: `bronze_impressions` columns.
        items: the catalogue (`item_id`, `price`).
        window_hours: the window rule's length.

    Returns:
        The `gold_attributed_events` columns, rows sorted by `event_date, ts, tenant,
        event_id`; unattributed events are not in it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from lake.schemas import GOLD_ATTRIBUTED_EVENTS

    ev = prepare_events_arrow(events)
    shown = explode_impressions_arrow(impressions)
    parts = []
    # 1. explicit: the id names a list of the same user that held the item
    claimed = ev.filter(pc.not_equal(ev["recommendation_id"], ""))
    if claimed.num_rows and shown.num_rows:
        hit = claimed.join(shown, keys=["recommendation_id", "item_id"], join_type="inner")
        hit = hit.filter(pc.fill_null(pc.equal(hit["imp_user_id"], hit["user_id"]), False))
        parts.append(hit.append_column("rule", pa.array(["explicit"] * hit.num_rows,
                                                        pa.string())))
    # 2. window: the last list that showed the item to the user within the window before
    unclaimed = ev.filter(pc.equal(ev["recommendation_id"], "")).drop_columns(
        ["recommendation_id"])
    if unclaimed.num_rows and shown.num_rows:
        cand = unclaimed.join(shown, keys=["user_id", "item_id"],
                              right_keys=["imp_user_id", "item_id"], join_type="inner")
        ts_us = pc.cast(cand["ts"], pa.int64())
        imp_us = pc.cast(cand["impression_ts"], pa.int64())
        window_us = int(round(window_hours * 3600 * _US))
        inside = pc.and_(pc.less_equal(imp_us, ts_us),
                         pc.greater_equal(imp_us, pc.subtract(ts_us, window_us)))
        cand = _first_rows(cand.filter(inside), ("tenant", "event_id"),
                           [("impression_ts", "descending"),
                            ("recommendation_id", "descending")])
        parts.append(cand.append_column("rule", pa.array(["window"] * cand.num_rows,
                                                         pa.string())))
    cols = [c for c in OUTPUT_COLUMNS if c not in ("revenue", "event_date")] + ["value"]
    if not parts:
        return GOLD_ATTRIBUTED_EVENTS.schema.empty_table()
    out = pa.concat_tables([p.select(cols) for p in parts], promote_options="permissive")
    prices = items.select(["item_id", "price"]).cast(
        pa.schema([pa.field("item_id", pa.string()), pa.field("price", pa.float64())]))
    out = out.join(prices, keys="item_id", join_type="left outer")
    quantity = pc.if_else(pc.fill_null(pc.greater(out["value"], 0.0), False), out["value"], 1.0)
    revenue = pc.if_else(pc.equal(out["event_type"], "purchase"),
                         pc.multiply(out["price"], quantity), pa.scalar(None, pa.float64()))
    out = out.append_column("revenue", revenue).append_column(
        "event_date", pc.cast(out["ts"], pa.date32()))
    out = out.take(pc.sort_indices(out, [("event_date", "ascending"), ("ts", "ascending"),
                                         ("tenant", "ascending"), ("event_id", "ascending")]))
    return out.select(list(OUTPUT_COLUMNS)).cast(GOLD_ATTRIBUTED_EVENTS.schema)


def _outcomes_arrow(att: pa.Table, keys: list[str]) -> pa.Table:
    """Clicks, carts, purchases, purchasers and revenue of attributed events per `keys`."""
    import pyarrow.compute as pc

    def distinct_pairs(event_type: str, name: str) -> pa.Table:
        t = att.filter(pc.equal(att["event_type"], event_type))
        t = _first_rows(t, ("recommendation_id", "item_id"), [])
        return t.group_by(keys).aggregate([([], "count_all")]).rename_columns(
            [*keys, name])

    bought = att.filter(pc.equal(att["event_type"], "purchase"))
    buys = bought.group_by(keys).aggregate([
        ([], "count_all"), ("user_id", "count_distinct"), ("revenue", "sum")]) \
        .rename_columns([*keys, "purchases", "purchasers", "revenue"])
    out = distinct_pairs("click", "clicks")
    for t in (distinct_pairs("add_to_cart", "carts"), buys):
        out = out.join(t, keys=keys, join_type="full outer")
    return out


def recommendation_metrics_arrow(impressions: pa.Table, attributed: pa.Table) -> pa.Table:
    """The daily metrics (module docstring) of `impressions`' lists on Arrow tables.

    Args:
        impressions: `bronze_impressions` rows of the days to compute.
        attributed: `gold_attributed_events` rows; those of lists not in `impressions`
            are ignored.

    Returns:
        `gold_recommendation_metrics` columns, sorted by day, list keys and position (the
        all-positions row first).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from lake.schemas import GOLD_RECOMMENDATION_METRICS

    s = GOLD_RECOMMENDATION_METRICS.schema
    if impressions.num_rows == 0:
        return s.empty_table()
    lists = pa.table({
        "recommendation_id": impressions["recommendation_id"],
        "user_id": impressions["user_id"],
        "impression_date": _shown_on(impressions),
        **{k: _text(impressions, k) for k in LIST_KEYS},
    })
    shown = explode_impressions_arrow(impressions)
    # an event counts on its list's day, under its list's keys (only these lists' events)
    att = attributed.select(["recommendation_id", "item_id", "user_id", "event_type",
                             "position", "revenue"])
    att = att.set_column(att.column_names.index("revenue"), "revenue",
                         pc.fill_null(att["revenue"], 0.0))
    att = att.join(lists.select(["recommendation_id", "impression_date", *LIST_KEYS]),
                   keys="recommendation_id", join_type="inner")
    group = ["impression_date", *LIST_KEYS]
    results = []
    for keys, shown_rows, who in ((group, lists, "user_id"),
                                  ([*group, "position"], shown, "imp_user_id")):
        exposure = shown_rows.group_by(keys).aggregate([
            ("recommendation_id", "count_distinct"), (who, "count_distinct")]) \
            .rename_columns([*keys, "impressions", "users"])
        t = exposure.join(_outcomes_arrow(att, keys), keys=keys, join_type="left outer")
        if "position" not in keys:
            t = t.append_column("position", pa.nulls(t.num_rows, pa.int32()))
        results.append(t)
    t = pa.concat_tables([r.select(list(METRIC_COLUMNS[:-3])) for r in results])
    for c in ("clicks", "carts", "purchases", "purchasers"):
        t = t.set_column(t.column_names.index(c), c, pc.cast(pc.fill_null(t[c], 0), pa.int64()))
    t = t.set_column(t.column_names.index("revenue"), "revenue",
                     pc.cast(pc.fill_null(t["revenue"], 0.0), pa.float64()))
    users = pc.cast(t["users"], pa.float64())
    users = pc.if_else(pc.greater(users, 0), users, pa.scalar(None, pa.float64()))
    t = t.append_column("ctr", pc.divide(pc.cast(t["clicks"], pa.float64()),
                                         pc.cast(t["impressions"], pa.float64())))
    t = t.append_column("conversion", pc.divide(pc.cast(t["purchasers"], pa.float64()), users))
    t = t.append_column("revenue_per_user", pc.divide(t["revenue"], users))
    t = t.take(pc.sort_indices(t, [(c, "ascending", "at_end")
                                   for c in ("impression_date", *LIST_KEYS)]
                               + [("position", "ascending", "at_start")]))
    return t.select(list(METRIC_COLUMNS)).cast(s)


# =========================================================================== Spark engine


def _text_col(df: DataFrame, name: str) -> Any:
    from pyspark.sql import functions as F

    if name not in df.columns:
        return F.lit("")
    return F.coalesce(F.col(name).cast("string"), F.lit(""))


def explode_impressions(impressions: DataFrame) -> DataFrame:
    """`explode_impressions_arrow` on Spark."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t = impressions.select(
        F.col("recommendation_id").cast("string").alias("recommendation_id"),
        F.col("user_id").cast("string").alias("imp_user_id"),
        F.col("ts").alias("impression_ts"),
        (F.col("impression_date") if "impression_date" in impressions.columns
         else F.to_date("ts")).alias("impression_date"),
        _text_col(impressions, "surface").alias("surface"),
        *(_text_col(impressions, k).alias(k) for k in LIST_KEYS),
        F.explode("items").alias("it"),
    ).select(
        "recommendation_id", F.col("it.item_id").cast("string").alias("item_id"),
        F.col("it.position").cast("int").alias("position"), "imp_user_id", "impression_ts",
        "impression_date", "surface", *LIST_KEYS,
    ).where(F.col("item_id").isNotNull())
    w = Window.partitionBy("recommendation_id", "item_id").orderBy(
        F.col("position").asc_nulls_last())
    return t.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1).drop("_r")


def prepare_events(events: DataFrame) -> DataFrame:
    """`prepare_events_arrow` on Spark."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t = events.select(
        F.col("event_id").cast("string").alias("event_id"),
        _text_col(events, "tenant").alias("tenant"),
        F.col("user_id").cast("string").alias("user_id"),
        F.col("item_id").cast("string").alias("item_id"),
        F.col("event_type").cast("string").alias("event_type"),
        F.col("value").cast("double").alias("value"),
        F.col("ts"),
        (F.col("received_at") if "received_at" in events.columns else F.col("ts"))
        .alias("received_at"),
        _text_col(events, "recommendation_id").alias("recommendation_id"),
    ).where(F.col("event_type").isin(*ATTRIBUTED_TYPES))
    w = Window.partitionBy("tenant", "event_id").orderBy(
        F.col("received_at").asc_nulls_last(), F.col("ts").asc_nulls_last())
    return t.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1).drop("_r")


def attribute_events(events: DataFrame, impressions: DataFrame, items: DataFrame, *,
                     window_hours: float) -> DataFrame:
    """`attribute_events_arrow` as Spark columns: the same rules, row for row."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ev = prepare_events(events)
    shown = explode_impressions(impressions)
    claimed = ev.where(F.col("recommendation_id") != "")
    explicit = claimed.join(shown, on=["recommendation_id", "item_id"], how="inner") \
        .where(F.col("imp_user_id") == F.col("user_id")).withColumn("rule", F.lit("explicit"))
    unclaimed = ev.where(F.col("recommendation_id") == "").drop("recommendation_id").alias("e")
    window_us = int(round(window_hours * 3600 * _US))
    s = shown.alias("s")
    ts_us, imp_us = F.unix_micros(F.col("e.ts")), F.unix_micros(F.col("s.impression_ts"))
    cand = unclaimed.join(
        s, (F.col("e.user_id") == F.col("s.imp_user_id"))
        & (F.col("e.item_id") == F.col("s.item_id"))
        & (imp_us <= ts_us) & (imp_us >= ts_us - F.lit(window_us)), how="inner",
    ).select("e.*", *(F.col(f"s.{c}") for c in shown.columns if c != "item_id"))
    w = Window.partitionBy("tenant", "event_id").orderBy(
        F.col("impression_ts").desc(), F.col("recommendation_id").desc())
    window = cand.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1) \
        .drop("_r").withColumn("rule", F.lit("window"))
    cols = [c for c in OUTPUT_COLUMNS if c not in ("revenue", "event_date")] + ["value"]
    out = explicit.select(*cols).unionByName(window.select(*cols))
    prices = items.select(F.col("item_id").cast("string").alias("item_id"),
                          F.col("price").cast("double").alias("price"))
    out = out.join(prices, on="item_id", how="left")
    quantity = F.when(F.col("value").isNotNull() & (F.col("value") > 0), F.col("value")) \
        .otherwise(F.lit(1.0))
    return out.select(
        *(c for c in cols if c != "value"),
        F.when(F.col("event_type") == "purchase", F.col("price") * quantity)
        .otherwise(F.lit(None).cast("double")).alias("revenue"),
        # the session time zone is UTC (lake.spark_session), so this is the UTC date
        F.to_date(F.col("ts")).alias("event_date"),
    ).select(*OUTPUT_COLUMNS)


def recommendation_metrics(impressions: DataFrame, attributed: DataFrame) -> DataFrame:
    """`recommendation_metrics_arrow` as Spark columns."""
    from pyspark.sql import functions as F

    lists = impressions.select(
        "recommendation_id", "user_id",
        (F.col("impression_date") if "impression_date" in impressions.columns
         else F.to_date("ts")).alias("impression_date"),
        *(_text_col(impressions, k).alias(k) for k in LIST_KEYS))
    shown = explode_impressions(impressions)
    att = attributed.select(
        "recommendation_id", "item_id", "user_id", "event_type", "position",
        F.coalesce(F.col("revenue"), F.lit(0.0)).alias("revenue"),
    ).join(lists.select("recommendation_id", "impression_date", *LIST_KEYS),
           on="recommendation_id", how="inner")
    group = ["impression_date", *LIST_KEYS]

    def pairs(event_type: str) -> Any:
        return F.count_distinct(F.when(F.col("event_type") == event_type, F.concat_ws(
            "\x1f", F.col("recommendation_id"), F.col("item_id"))))

    bought = F.col("event_type") == "purchase"
    outcomes = [
        pairs("click").alias("clicks"), pairs("add_to_cart").alias("carts"),
        F.sum(F.when(bought, 1).otherwise(0)).cast("long").alias("purchases"),
        F.count_distinct(F.when(bought, F.col("user_id"))).cast("long").alias("purchasers"),
        F.sum(F.when(bought, F.col("revenue")).otherwise(0.0)).alias("revenue"),
    ]
    parts = []
    for keys, rows, who in ((group, lists, "user_id"),
                            ([*group, "position"], shown, "imp_user_id")):
        exposure = rows.groupBy(*keys).agg(
            F.count_distinct("recommendation_id").cast("long").alias("impressions"),
            F.count_distinct(who).cast("long").alias("users"))
        t = exposure.join(att.groupBy(*keys).agg(*outcomes), on=keys, how="left")
        if "position" not in keys:
            t = t.withColumn("position", F.lit(None).cast("int"))
        parts.append(t.select(*METRIC_COLUMNS[:-3]))
    t = parts[0].unionByName(parts[1])
    for c in ("clicks", "carts", "purchases", "purchasers"):
        t = t.withColumn(c, F.coalesce(F.col(c), F.lit(0)).cast("long"))
    t = t.withColumn("revenue", F.coalesce(F.col("revenue"), F.lit(0.0)).cast("double"))
    users = F.when(F.col("users") > 0, F.col("users").cast("double"))
    return t.select(
        *METRIC_COLUMNS[:-3],
        (F.col("clicks") / F.col("impressions")).alias("ctr"),
        (F.col("purchasers") / users).alias("conversion"),
        (F.col("revenue") / users).alias("revenue_per_user"),
    )


# =========================================================================== the job


def _logged_rows(lake: Lake, name: str, column: str, lo: date, hi: date) -> int | None:
    """Rows in partitions `column` in [lo, hi] from the Delta log's file statistics (None
    when a file carries no count)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not lake.exists(name):
        return 0
    actions = pa.table(lake.delta(name).get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    d = pc.cast(actions.column(f"partition.{column}"), pa.date32())
    inside = pc.and_(pc.greater_equal(d, pa.scalar(lo, pa.date32())),
                     pc.less_equal(d, pa.scalar(hi, pa.date32())))
    counts = actions.filter(pc.fill_null(inside, False)).column("num_records")
    if counts.null_count:
        return None
    return int(pc.sum(counts).as_py() or 0)


def _sql_range(column: str, lo: date, hi: date) -> str:
    return f"{column} >= '{lo.isoformat()}' AND {column} <= '{hi.isoformat()}'"


def plan_days(settings: Settings, *, start: date | None, end: date | None,
              as_of: date | None, now: datetime | None = None,
              bounds: tuple[date, date] | None = None) -> list[date]:
    """The days a run rewrites: `start..end`, or the settling days up to `as_of`
    (`D - ceil(window_hours / 24) .. D`; default as-of: `lake.as_of.default_as_of`)."""
    from lake.as_of import default_as_of

    if (start is None) != (end is None):
        raise JobError("give both --start and --end, or neither")
    if start is not None and end is not None:
        if as_of is not None:
            raise JobError("give --as-of or --start/--end, not both")
        return date_range(start, end)
    if as_of is None:
        as_of = default_as_of(now or datetime.now(UTC), bounds)
    return date_range(as_of - timedelta(days=window_days(settings.attribution.window_hours)),
                      as_of)


def run(settings: Settings, *, start: date | None = None, end: date | None = None,
        as_of: date | None = None, spark: SparkSession | None = None,
        now: datetime | None = None) -> dict[str, Any]:
    """Attribute the events of the planned days and rewrite the metrics of their lists.

    Returns:
        `{"job", "start", "end", "engine", "events", "claimed", "attributed", "explicit",
        "window", "unattributed_claims", "impressions", "metric_rows", "attributed_version",
        "metrics_version", "seconds"}`; `claimed` counts events carrying a
        `recommendation_id`, `unattributed_claims` those whose id did not hold.
    """
    from lake.as_of import event_date_bounds
    from lake.tables import Lake
    from spark_jobs.engine import choose_engine

    t0 = time.perf_counter()
    lake = Lake.from_settings(settings.lake)
    explicit_days = start is not None or end is not None or as_of is not None
    days = plan_days(settings, start=start, end=end, as_of=as_of, now=now,
                     bounds=None if explicit_days else event_date_bounds(lake))
    for name in ("silver_events", "bronze_impressions", "items", "gold_attributed_events",
                 "gold_recommendation_metrics"):
        lake.ensure(name)
    lo, hi = days[0], days[-1]
    cfg = settings.attribution
    reach = max(window_days(cfg.window_hours), cfg.explicit_lookback_days)
    rows = [_logged_rows(lake, "silver_events", "event_date", lo, hi),
            _logged_rows(lake, "bronze_impressions", "impression_date", lo - timedelta(reach), hi)]
    engine = choose_engine(settings.spark, None if None in rows else sum(r or 0 for r in rows),
                           spark)
    step = _run_arrow if engine == "arrow" else _run_spark
    stats = step(settings, lake, days, spark)
    return {"job": "attribution", "start": lo, "end": hi, "engine": engine, **stats,
            "seconds": round(time.perf_counter() - t0, 3)}


def _event_columns(lake: Lake) -> list[str]:
    from lake.schemas import SILVER_EVENTS

    wanted = ("event_id", "tenant", "user_id", "item_id", "event_type", "value", "ts",
              "received_at", "recommendation_id")
    return [c for c in wanted if c in SILVER_EVENTS.schema.names]


def _run_arrow(settings: Settings, lake: Lake, days: list[date],
               spark: SparkSession | None) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from lake.spark_bridge import write_table

    cfg = settings.attribution
    lo, hi = days[0], days[-1]
    events = lake.read("silver_events", columns=_event_columns(lake),
                       filters=(ds.field("event_date") >= lo) & (ds.field("event_date") <= hi))
    events = events.filter(pc.is_in(events["event_type"], pa.array(ATTRIBUTED_TYPES)))
    claims = pc.unique(_text(events, "recommendation_id"))
    near = lo - timedelta(window_days(cfg.window_hours))
    far = lo - timedelta(cfg.explicit_lookback_days)
    # the window's reach in full; further back only the lists that events name
    wanted = (ds.field("impression_date") >= near) | (
        (ds.field("impression_date") >= far) & ds.field("recommendation_id").isin(claims))
    impressions = lake.read("bronze_impressions",
                            filters=wanted & (ds.field("impression_date") <= hi))
    items = lake.read("items", columns=["item_id", "price"])
    attributed = attribute_events_arrow(events, impressions, items,
                                        window_hours=cfg.window_hours)
    att_version = write_table(attributed, lake, "gold_attributed_events", mode="overwrite",
                              partitions=[{"event_date": d} for d in days])
    # the metrics of the lists shown on `days`: their events may fall after `hi`
    shown = lake.read("bronze_impressions", filters=(ds.field("impression_date") >= lo)
                      & (ds.field("impression_date") <= hi))
    later = hi + timedelta(days=max(window_days(cfg.window_hours), cfg.explicit_lookback_days))
    earned = lake.read("gold_attributed_events", filters=(ds.field("event_date") >= lo)
                       & (ds.field("event_date") <= later))
    metrics = recommendation_metrics_arrow(shown, earned)
    met_version = write_table(metrics, lake, "gold_recommendation_metrics", mode="overwrite",
                              partitions=[{"impression_date": d} for d in days])
    return _stats(events.num_rows, int(pc.sum(pc.not_equal(
        _text(events, "recommendation_id"), "")).as_py() or 0), attributed,
        shown.num_rows, metrics.num_rows, att_version, met_version)


def _stats(n_events: int, claimed: int, attributed: pa.Table, impressions: int,
           metric_rows: int, att_version: int, met_version: int) -> dict[str, Any]:
    import pyarrow.compute as pc

    explicit = int(pc.sum(pc.equal(attributed["rule"], "explicit")).as_py() or 0)
    return {"events": n_events, "claimed": claimed, "attributed": attributed.num_rows,
            "explicit": explicit, "window": attributed.num_rows - explicit,
            "unattributed_claims": claimed - explicit, "impressions": impressions,
            "metric_rows": metric_rows, "attributed_version": att_version,
            "metrics_version": met_version}


def _run_spark(settings: Settings, lake: Lake, days: list[date],
               spark: SparkSession | None) -> dict[str, Any]:
    from pyspark.sql import functions as F

    from lake.spark_bridge import read_table, write_table
    from lake.spark_session import get_spark

    spark = spark or get_spark(settings.spark)
    cfg = settings.attribution
    lo, hi = days[0], days[-1]
    events = read_table(spark, lake, "silver_events",
                        partition_filter=_sql_range("event_date", lo, hi)) \
        .where(F.col("event_type").isin(*ATTRIBUTED_TYPES))
    events = events.select(*_event_columns(lake)).cache()
    near = lo - timedelta(window_days(cfg.window_hours))
    far = lo - timedelta(cfg.explicit_lookback_days)
    impressions = read_table(spark, lake, "bronze_impressions",
                             partition_filter=_sql_range("impression_date", min(near, far), hi))
    if "recommendation_id" in events.columns:
        claims = events.where(F.col("recommendation_id") != "").select("recommendation_id") \
            .distinct()
        old = impressions.where(F.col("impression_date") < near) \
            .join(claims, on="recommendation_id", how="left_semi")
        impressions = impressions.where(F.col("impression_date") >= near).unionByName(old)
    else:
        impressions = impressions.where(F.col("impression_date") >= near)
    items = read_table(spark, lake, "items")
    attributed = attribute_events(events, impressions, items,
                                  window_hours=cfg.window_hours).cache()
    try:
        out = attributed.repartition("event_date").sortWithinPartitions(
            "event_date", "ts", "tenant", "event_id")
        att_version = write_table(out, lake, "gold_attributed_events", mode="overwrite",
                                  partitions=[{"event_date": d} for d in days])
        att_rows = attributed.groupBy("rule").count().collect()
        n_events = events.count()
        claimed = events.where(F.col("recommendation_id") != "").count() \
            if "recommendation_id" in events.columns else 0
    finally:
        attributed.unpersist()
        events.unpersist()
    later = hi + timedelta(days=max(window_days(cfg.window_hours), cfg.explicit_lookback_days))
    shown = read_table(spark, lake, "bronze_impressions",
                       partition_filter=_sql_range("impression_date", lo, hi))
    earned = read_table(spark, lake, "gold_attributed_events", att_version,
                        partition_filter=_sql_range("event_date", lo, later))
    metrics = recommendation_metrics(shown, earned).cache()
    try:
        met_version = write_table(metrics.repartition("impression_date"), lake,
                                  "gold_recommendation_metrics", mode="overwrite",
                                  partitions=[{"impression_date": d} for d in days])
        metric_rows = metrics.count()
        n_shown = shown.count()
    finally:
        metrics.unpersist()
    by_rule = {r["rule"]: int(r["count"]) for r in att_rows}
    explicit = by_rule.get("explicit", 0)
    total = sum(by_rule.values())
    return {"events": n_events, "claimed": claimed, "attributed": total, "explicit": explicit,
            "window": total - explicit, "unattributed_claims": claimed - explicit,
            "impressions": n_shown, "metric_rows": metric_rows,
            "attributed_version": att_version, "metrics_version": met_version}


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.attribution",
                        "Attribute clicks, carts and purchases to recommendation lists; "
                        "rewrite the daily recommendation metrics.")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, default=None,
                        help="last day to rewrite (with the days before it that the window "
                             "reaches; default: yesterday, or the last event date)")
    parser.add_argument("--start", type=parse_date, default=None,
                        help="first day to rewrite (with --end: exactly that range)")
    parser.add_argument("--end", type=parse_date, default=None, help="last day (included)")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), start=args.start, end=args.end, as_of=args.as_of)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
