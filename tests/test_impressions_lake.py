"""`Event.recommendation_id` and `bronze_impressions` in the lake: schema evolution of older
bronze tables and WAL records, the fleet stream, bulk loads, compaction (both engines) and
the erasure purge. Real Delta tables, real WAL files."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lake.config import load_settings
from lake.erasure import purge
from lake.schemas import EVENT_FIELDS, TENANT
from lake.tables import Lake
from lake.validation import EventValidationError, validate_events_table
from online.fleet_channel import decode_events, encode_events
from online.impressions import impressions_table
from online.ingest import REC_EVENTS, REC_IMPRESSIONS, IngestPipeline
from online.wal import WriteAheadLog
from spark_jobs import compact

TS = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def settings(tmp: Path, **extra: Any) -> Any:
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
        "server": {"wal_dir": str(tmp / "wal"), "flush_interval_s": 3600.0}, **extra})


def event(eid: str, rec: str | None = None, user: str = "u1") -> dict[str, Any]:
    e = {"event_id": eid, "user_id": user, "item_id": "i1", "event_type": "click", "ts": TS}
    return e if rec is None else {**e, "recommendation_id": rec}


def by_id(lake: Lake, table: str) -> dict[str, str]:
    t = lake.read(table, columns=["event_id", "recommendation_id"])
    return dict(zip(t["event_id"].to_pylist(), t["recommendation_id"].to_pylist(),
                    strict=True))


def test_an_older_bronze_gains_the_column_and_its_rows_read_empty(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    old = [{**event("old-1"), "received_at": TS, "session_id": None, "properties": None,
            "event_date": TS.date(), "tenant": ""}]
    # a bronze table written before recommendation ids: the tenant is its last column
    write_deltalake(str(lake.path("bronze_events")),
                    pa.Table.from_pylist(old, schema=pa.schema([*EVENT_FIELDS, TENANT])),
                    partition_by=["event_date"])
    with IngestPipeline(settings(tmp_path), lake) as p:
        assert len(p.ingest([event("new-1", "rec-1"), event("new-2", "")]).accepted) == 2
    names = [f.name for f in lake.delta("bronze_events").schema().fields]
    assert names[-1] == "recommendation_id"
    assert by_id(lake, "bronze_events") == {"old-1": "", "new-1": "rec-1", "new-2": ""}


def test_wal_records_from_before_recommendation_ids_replay_with_empty(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    us = int(TS.timestamp() * 1_000_000)
    wal = WriteAheadLog.open(cfg.server.wal_dir)
    # as the two earlier versions wrote them: ten fields (with tenant), nine (without)
    wal.write(REC_EVENTS, json.dumps(
        [["with-tenant", "u1", "i1", "view", None, us, us, None, None, "shopA"]]).encode())
    wal.sync(wal.write(REC_EVENTS, json.dumps(
        [["no-tenant", "u1", "i1", "view", None, us, us, None, None]]).encode()))
    wal.close()
    lake = Lake(tmp_path / "lake")
    with IngestPipeline(cfg, lake) as p:
        assert p.replayed_events == 2
    assert by_id(lake, "bronze_events") == {"with-tenant": "", "no-tenant": ""}


def test_replay_commits_impression_records_past_the_tables_version(tmp_path: Path) -> None:
    """A WAL holding both record types: each table gets exactly its own records, once
    (the second start finds both tables at their versions and commits nothing)."""
    cfg = settings(tmp_path)
    lake = Lake(tmp_path / "lake")
    us = int(TS.timestamp() * 1_000_000)
    row = ["r1", "", "recommend", "u1", None, ["i1", "i2"], [0.5, 0.25], "v1",
           "personalised", "", "", "{}", us]
    wal = WriteAheadLog.open(cfg.server.wal_dir)
    wal.write(REC_IMPRESSIONS, json.dumps([row]).encode())
    wal.write(REC_EVENTS, json.dumps([["e1", "u1", "i1", "view", None, us, us, None, None, "",
                                       "r1"]]).encode())
    wal.sync(wal.write(REC_IMPRESSIONS, json.dumps([["r2", *row[1:]]]).encode()))
    wal.close()
    for _ in range(2):  # the second start finds everything committed: nothing twice
        with IngestPipeline(cfg, lake):
            pass
    got = lake.read("bronze_impressions").to_pylist()
    assert sorted(r["recommendation_id"] for r in got) == ["r1", "r2"]
    assert got[0]["items"] == [{"item_id": "i1", "position": 0, "score": 0.5},
                               {"item_id": "i2", "position": 1, "score": 0.25}]
    assert by_id(lake, "bronze_events") == {"e1": "r1"}


def test_the_fleet_stream_carries_it_and_older_rows_decode_empty() -> None:
    evs = [{**event("e1", "rec-9"), "received_at": TS, "tenant": "shopA"},
           {**event("e2"), "received_at": TS, "tenant": ""}]
    wire = decode_events(encode_events(evs))
    assert [(e["event_id"], e["tenant"], e["recommendation_id"]) for e in wire] == [
        ("e1", "shopA", "rec-9"), ("e2", "", "")]
    # a replica from before recommendation ids sends eight fields
    old = json.dumps([["e3", "u1", "i1", "click", None, 0, None, "shopA"]]).encode()
    assert [(e["tenant"], e["recommendation_id"]) for e in decode_events(old)] == [
        ("shopA", "")]


def test_bulk_loads_take_it_as_an_optional_id() -> None:
    base = {"event_id": ["a", "b", "c"], "user_id": ["u"] * 3, "item_id": ["i"] * 3,
            "event_type": ["click"] * 3, "ts": [TS] * 3}
    out = validate_events_table(pa.table(base), now=TS)
    assert out["recommendation_id"].to_pylist() == [None] * 3  # the default fills it on write
    given = validate_events_table(pa.table({**base, "recommendation_id": ["r1", "", None]}),
                                  now=TS)
    assert given["recommendation_id"].to_pylist() == ["r1", "", None]
    with pytest.raises(EventValidationError) as bad:
        validate_events_table(pa.table({**base, "recommendation_id": ["r1", "x\x07", ""]}),
                              now=TS)
    assert (bad.value.row, bad.value.field) == (1, "recommendation_id")


@pytest.fixture(params=["arrow", "spark"])
def engine(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """(engine, the Spark session for it or None)."""
    spark = request.getfixturevalue("spark") if request.param == "spark" else None
    return str(request.param), spark


def test_compaction_carries_it_into_silver(tmp_path: Path,
                                           engine: tuple[str, Any]) -> None:
    name, spark = engine
    cfg = settings(tmp_path, spark={"engine": name})
    lake = Lake(tmp_path / "lake")
    old = [{**event("old-1"), "received_at": TS, "session_id": None, "properties": None,
            "event_date": TS.date(), "tenant": ""}]
    write_deltalake(str(lake.path("bronze_events")),
                    pa.Table.from_pylist(old, schema=pa.schema([*EVENT_FIELDS, TENANT])),
                    partition_by=["event_date"])
    later = TS + timedelta(minutes=1)
    lake.append("bronze_events", pa.Table.from_pylist([
        {**event("new-1", "rec-1"), "received_at": later},
        {**event("new-1", "rec-resent"), "received_at": later + timedelta(seconds=5)},
    ]))
    compact.run(cfg, start=date(2026, 3, 1), end=date(2026, 3, 3), spark=spark)
    assert by_id(lake, "silver_events") == {"old-1": "", "new-1": "rec-1"}  # first arrival


def test_purge_deletes_again_the_impressions_shown_before_the_erasure(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    lake = Lake(tmp_path / "lake")
    erased_at = datetime.now(UTC)

    def shown(rec: str, user: str, at: datetime) -> list[Any]:
        return [rec, "", "recommend", user, None, ["i1"], [1.0], "v1", "personalised", "",
                "", "{}", int(at.timestamp() * 1_000_000)]

    with IngestPipeline(cfg, lake) as p:
        p.forget_user("gone")
    # a replica that never heard of the erasure flushes what it showed the user before it
    lake.append("bronze_impressions", impressions_table([
        shown("before", "gone", erased_at - timedelta(minutes=5)),
        shown("after", "gone", erased_at + timedelta(minutes=5)),
        shown("other", "stays", erased_at - timedelta(minutes=5))]))
    out = purge(cfg)
    assert out["rows_deleted_again"]["bronze_impressions"] == 1
    left = lake.read("bronze_impressions", columns=["recommendation_id"])
    assert sorted(left["recommendation_id"].to_pylist()) == ["after", "other"]
