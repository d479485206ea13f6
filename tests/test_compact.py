"""Compaction bronze -> silver: validation, first-arrival de-duplication, idempotent reruns.

Every test runs on both engines (`spark_jobs.engine`): the same known answers for each."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest
from pyspark.sql.types import (
    DoubleType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from lake.config import load_settings
from lake.tables import Lake
from spark_jobs import compact
from spark_jobs.compact import compact_events, compact_events_arrow

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

# Nullable on purpose: the transform must cope with whatever bronze holds.
RAW = StructType([
    StructField("event_id", StringType()),
    StructField("user_id", StringType()),
    StructField("item_id", StringType()),
    StructField("event_type", StringType()),
    StructField("value", DoubleType()),
    StructField("ts", TimestampType()),
    StructField("received_at", TimestampType()),
    StructField("session_id", StringType()),
    StructField("properties", StringType()),
])


def ev(event_id, user="u1", item="i1", etype="view", value=None, ts=T0, received=None,
       session=None):
    return (event_id, user, item, etype, value, ts,
            received if received is not None else ts + timedelta(seconds=1), session, None)


RAW_ARROW = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
    ("event_type", pa.string()), ("value", pa.float64()),
    ("ts", pa.timestamp("us", tz="UTC")), ("received_at", pa.timestamp("us", tz="UTC")),
    ("session_id", pa.string()), ("properties", pa.string()),
])


@pytest.fixture(params=["spark", "arrow"])
def compacted(request, spark):
    """Raw rows -> {event_id: silver row} with the engine of the test's parameter."""
    def run(rows):
        if request.param == "spark":
            return {r["event_id"]: r.asDict()
                    for r in compact_events(spark.createDataFrame(rows, RAW)).collect()}
        table = pa.Table.from_pylist([dict(zip(RAW_ARROW.names, r, strict=True)) for r in rows],
                                     schema=RAW_ARROW)
        return {r["event_id"]: r for r in compact_events_arrow(table).to_pylist()}
    return run


def test_invalid_rows_are_dropped(compacted):
    rows = [
        ev("ok-view"),
        ev("ok-purchase", etype=" Purchase ", value=19.5),  # normalised to "purchase"
        ev("null-user", user=None),
        ev("blank-item", item="  "),
        ev("unknown-type", etype="like"),
        ev("nan-value", etype="rating", value=float("nan")),
        ev("inf-value", etype="add_to_cart", value=float("inf")),
        ev("neg-inf-value", etype="add_to_cart", value=float("-inf")),
        ev("null-ts", ts=None, received=T0),
        (None, "u1", "i1", "view", None, T0, T0, None, None),  # null event_id
        ("null-received", "u1", "i1", "view", None, T0, None, None, None),
    ]
    out = compacted(rows)
    assert set(out) == {"ok-view", "ok-purchase"}
    assert out["ok-purchase"]["event_type"] == "purchase"
    assert out["ok-purchase"]["value"] == 19.5
    assert out["ok-view"]["value"] is None
    assert out["ok-view"]["event_date"] == date(2026, 3, 10)


def test_first_arrival_wins_and_is_order_independent(compacted):
    rows = [
        ev("e1", session="third", received=T0 + timedelta(seconds=5)),
        ev("e1", session="first", received=T0 + timedelta(seconds=1)),
        ev("e1", session="second", received=T0 + timedelta(seconds=3)),
        # exact tie on received_at and ts: the smaller user_id wins, whatever the order
        ev("e2", user="u9", received=T0 + timedelta(seconds=2)),
        ev("e2", user="u2", received=T0 + timedelta(seconds=2)),
        ev("e3", item="i3"),
    ]
    for order in (rows, list(reversed(rows))):
        out = compacted(order)
        assert sorted(out) == ["e1", "e2", "e3"]
        assert out["e1"]["session_id"] == "first"
        # collect() gives naive local datetimes; compare instants
        assert out["e1"]["received_at"].timestamp() == (T0 + timedelta(seconds=1)).timestamp()
        assert out["e2"]["user_id"] == "u2"


def test_late_events_are_kept_in_their_event_date(compacted):
    late_ts = datetime(2026, 1, 2, 23, 30, tzinfo=UTC)
    rows = [ev("late", ts=late_ts, received=late_ts + timedelta(days=60))]
    out = compacted(rows)
    assert out["late"]["event_date"] == date(2026, 1, 2)


def test_output_has_the_silver_columns(spark):
    from lake.schemas import SILVER_EVENTS

    df = compact_events(spark.createDataFrame([ev("x")], RAW))
    assert df.columns == SILVER_EVENTS.schema.names
    table = compact_events_arrow(pa.Table.from_pylist(
        [dict(zip(RAW_ARROW.names, ev("x"), strict=True))], schema=RAW_ARROW))
    assert table.schema.names == SILVER_EVENTS.schema.names


# -- the job -----------------------------------------------------------------------------
D1, D2, D3 = date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)


def _at(d: date, hour: int, minute: int = 0) -> datetime:
    return datetime(d.year, d.month, d.day, hour, minute, tzinfo=UTC)


def bronze_rows() -> list[dict]:
    rows = []
    for d in (D1, D2, D3):
        for n in range(3):
            ts = _at(d, 10 + n)
            rows.append(dict(event_id=f"{d}-{n}", user_id=f"u{n}", item_id=f"i{n}",
                             event_type="view", value=None, ts=ts,
                             received_at=ts + timedelta(seconds=1)))
    # a retried delivery of one event (a later copy) and a late event for D1
    dup = dict(rows[0])
    dup["received_at"] = dup["received_at"] + timedelta(hours=2)
    dup["user_id"] = "u-retry"
    rows.append(dup)
    rows.append(dict(event_id="late-1", user_id="u5", item_id="i5", event_type="purchase",
                     value=9.0, ts=_at(D1, 23, 50), received_at=_at(D3, 9)))
    return rows


def silver_contents(lake: Lake) -> list[dict]:
    t = lake.read("silver_events")
    return sorted(t.to_pylist(), key=lambda r: r["event_id"])


@pytest.fixture(params=["spark", "arrow"])
def settings(request, tmp_path):
    return load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                            "model": {"dir": str(tmp_path / "models")},
                                            "spark": {"engine": request.param}})


def test_compact_job_rerun_is_identical_and_empty_dates_are_cleared(spark, settings):
    lake = Lake.from_settings(settings.lake)
    lake.append("bronze_events", pa.Table.from_pylist(bronze_rows()))

    first = compact.run(settings, start=D1, end=D3, spark=spark)
    assert first["engine"] == settings.spark.engine
    assert first["bronze_rows"] == 11
    assert first["silver_rows"] == 10  # the duplicate is gone, the late event is kept
    rows = silver_contents(lake)
    assert len(rows) == 10
    assert len({r["event_id"] for r in rows}) == 10
    by_id = {r["event_id"]: r for r in rows}
    assert by_id[f"{D1}-0"]["user_id"] == "u0"  # first arrival, not the retry
    assert by_id["late-1"]["event_date"] == D1

    again = compact.run(settings, start=D1, end=D3, spark=spark)
    assert again["silver_rows"] == 10
    assert silver_contents(lake) == rows

    # D2's bronze events are erased: recompacting D2 alone empties exactly that partition
    lake.delete("bronze_events", "event_date = '2026-03-02'")
    compact.run(settings, start=D2, end=D2, spark=spark)
    after = silver_contents(lake)
    assert [r for r in after if r["event_date"] == D2] == []
    assert after == [r for r in rows if r["event_date"] != D2]


def test_compact_cli_prints_one_json_line(spark, settings, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("LAMBDAREC__LAKE__ROOT", str(tmp_path / "lake"))
    lake = Lake.from_settings(settings.lake)
    lake.append("bronze_events", pa.Table.from_pylist(bronze_rows()))
    rc = compact.main(["--start", str(D1), "--end", str(D1)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["job"] == "compact" and result["silver_rows"] == 4

    rc = compact.main(["--start", str(D3), "--end", str(D1)])
    assert rc == 2
    assert "before start date" in capsys.readouterr().err


def silver_files(lake: Lake) -> dict[str, set[str]]:
    """Data file paths of silver per event date (what a rewrite of a date replaces)."""
    actions = pa.table(lake.delta("silver_events").get_add_actions(flatten=True))
    out: dict[str, set[str]] = {}
    for path, d in zip(actions.column("path").to_pylist(),
                       actions.column("partition.event_date").to_pylist(), strict=True):
        out.setdefault(str(d), set()).add(path)
    return out


def test_incremental_compaction_rewrites_only_the_dates_bronze_commits_changed(spark, settings):
    lake = Lake.from_settings(settings.lake)
    lake.append("bronze_events", pa.Table.from_pylist(bronze_rows()))

    first = compact.run(settings, spark=spark)  # no watermark yet: every date
    assert (first["mode"], first["dates"], first["silver_rows"]) == ("full", 3, 10)
    assert compact.watermark(lake) == lake.version("bronze_events")
    rows, files = silver_contents(lake), silver_files(lake)

    # no new events: nothing to do, no commit, the table as it was
    again = compact.run(settings, spark=spark)
    assert (again["mode"], again["dates"]) == ("incremental", 0)
    assert again["silver_version"] == first["silver_version"]
    assert lake.version("silver_events") == first["silver_version"]
    assert silver_contents(lake) == rows

    # a new event on D2 and a late one for D1: exactly those two dates are rewritten
    late = _at(D1, 8)
    lake.append("bronze_events", pa.Table.from_pylist([
        dict(event_id="new-d2", user_id="u9", item_id="i9", event_type="click", value=None,
             ts=_at(D2, 18), received_at=_at(D2, 18)),
        dict(event_id="late-2", user_id="u8", item_id="i8", event_type="view", value=None,
             ts=late, received_at=_at(D3, 20)),
    ]))
    inc = compact.run(settings, spark=spark)
    assert (inc["mode"], inc["dates"], inc["start"], inc["end"]) == ("incremental", 2, D1, D2)
    assert inc["silver_rows"] == 4 + 3 + 2  # D1: 3 + late-1, D2: 3, plus the two new ones
    after = silver_files(lake)
    assert after[str(D3)] == files[str(D3)]  # untouched: the same file
    assert after[str(D1)] != files[str(D1)] and after[str(D2)] != files[str(D2)]
    by_id = {r["event_id"]: r for r in silver_contents(lake)}
    assert len(by_id) == 12 and by_id["late-2"]["event_date"] == D1

    # coalescing bronze's small files changes no rows: the log says so, nothing to do
    assert lake.coalesce_small_files("bronze_events")["numFilesRemoved"] > 0
    assert compact.run(settings, spark=spark)["dates"] == 0

    # erasing D3's bronze events empties exactly D3
    lake.delete("bronze_events", "event_date = '2026-03-03'")
    gone = compact.run(settings, spark=spark)
    assert (gone["mode"], gone["dates"], gone["start"]) == ("incremental", 1, D3)
    incremental = silver_contents(lake)
    assert all(r["event_date"] != D3 for r in incremental) and len(incremental) == 9

    # the incremental result is what a full compaction of bronze gives
    full = compact.run(settings, full=True, spark=spark)
    assert (full["mode"], full["dates"]) == ("full", 2)  # D1 and D2: D3 has no rows anywhere
    assert silver_contents(lake) == incremental


def test_a_log_that_cannot_tell_falls_back_to_every_date(spark, settings):
    from lake.delta_log import commit_file

    lake = Lake.from_settings(settings.lake)
    lake.append("bronze_events", pa.Table.from_pylist(bronze_rows()))
    compact.run(settings, spark=spark)
    v = lake.append("bronze_events", pa.Table.from_pylist([dict(
        event_id="x", user_id="u", item_id="i", event_type="view", value=None,
        ts=_at(D2, 1), received_at=_at(D2, 1))]))
    # a checkpoint after it, then the commit cleaned up (what log retention does)
    lake.delta("bronze_events").create_checkpoint()
    commit_file(lake.path("bronze_events"), v).rename(lake.path("bronze_events") / "moved")
    assert compact.plan_dates(lake, lake.version("bronze_events"))[0] == "full"


def test_compact_needs_both_dates_or_neither(settings, capsys):
    assert compact.main(["--start", str(D1)]) == 2
    assert "--start and --end" in capsys.readouterr().err


# -- tenants -----------------------------------------------------------------------------
RAW_TENANT = StructType([*RAW.fields, StructField("tenant", StringType())])


@pytest.fixture(params=["spark", "arrow"])
def compacted_by_key(request, spark):
    """Raw rows with a tenant last -> {(tenant, event_id): silver row}, per engine."""
    def run(rows):
        if request.param == "spark":
            got = [r.asDict() for r in
                   compact_events(spark.createDataFrame(rows, RAW_TENANT)).collect()]
        else:
            schema = RAW_ARROW.append(pa.field("tenant", pa.string()))
            got = compact_events_arrow(pa.Table.from_pylist(
                [dict(zip(schema.names, r, strict=True)) for r in rows], schema=schema)
            ).to_pylist()
        out = {(r["tenant"], r["event_id"]): r for r in got}
        assert len(out) == len(got), "one silver row per (tenant, event_id)"
        return out
    return run


def test_an_event_is_its_id_within_its_tenant(compacted_by_key):
    later = T0 + timedelta(minutes=5)
    rows = [
        (*ev("order-1", user="uA", received=T0), "shopA"),
        (*ev("order-1", user="uA-retry", received=later), "shopA"),  # A's resend: dropped
        (*ev("order-1", user="uB", received=later), "shopB"),  # another shop's order: kept
        (*ev("order-1", user="u-old", received=T0), None),  # bronze before tenants: ""
        (*ev("order-1", user="u-open", received=later), ""),  # same tenant "": dropped
    ]
    for order in (rows, list(reversed(rows))):
        out = compacted_by_key(order)
        assert {k: r["user_id"] for k, r in out.items()} == {
            ("shopA", "order-1"): "uA", ("shopB", "order-1"): "uB", ("", "order-1"): "u-old"}


def test_compact_job_keeps_each_tenants_events_of_an_old_bronze(spark, settings):
    from deltalake import write_deltalake

    from lake.schemas import EVENT_FIELDS

    lake = Lake.from_settings(settings.lake)
    old = [r | {"session_id": None, "properties": None, "event_date": r["ts"].date()}
           for r in bronze_rows()]
    # a bronze table written before tenants existed: no tenant column at all
    write_deltalake(str(lake.path("bronze_events")),
                    pa.Table.from_pylist(old, schema=pa.schema(EVENT_FIELDS)),
                    partition_by=["event_date"])
    # then two shops send the same ids (the table gains the column with this write)
    shops = [dict(event_id="order-7", user_id=user, item_id="i7", event_type="purchase",
                  value=5.0, ts=_at(D2, 20), received_at=_at(D2, 20, n), tenant=shop)
             for n, (shop, user) in enumerate([("shopA", "uA"), ("shopB", "uB"),
                                                ("shopA", "uA-again")])]
    lake.append("bronze_events", pa.Table.from_pylist(shops))
    assert "tenant" in [f.name for f in lake.delta("bronze_events").schema().fields]

    compact.run(settings, start=D1, end=D3, spark=spark)
    rows = lake.read("silver_events")
    assert "tenant" in [f.name for f in lake.delta("silver_events").schema().fields]
    got = sorted((r["tenant"], r["event_id"], r["user_id"]) for r in rows.to_pylist())
    want = sorted({("", r["event_id"], r["user_id"]) for r in bronze_rows()
                   if r["user_id"] != "u-retry"}
                  | {("shopA", "order-7", "uA"), ("shopB", "order-7", "uB")})
    assert got == want
