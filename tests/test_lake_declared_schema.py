"""Every table keeps its declared schema through every write path: appends, merges, deletes
(ForgetUser), the erasure purge and optimize; and a lake written before is repaired.

delta-rs' DataFusion writers (DELETE, MERGE) store strings as `string_view`, after which
a filtered pyarrow read of the table fails (`lake.repair`). Real Delta tables under
tmp_path, the project's own writers (the ingest pipeline and its WAL, `Lake`, the
compaction job), the purge and the repair command as the processes an operator runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from lake.config import Settings, load_settings
from lake.delta_log import changed_partition_values
from lake.schemas import EVENT_FIELDS, ITEMS, TABLES
from lake.tables import Lake
from online.ingest import IngestPipeline
from spark_jobs import compact

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)
DAYS = (NOW - timedelta(days=1), NOW)
USERS = ("u0", "u1", "u2")
VICTIM = "u1"


def make_settings(tmp: Path) -> Settings:
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
        "server": {"wal_dir": str(tmp / "wal"), "flush_interval_s": 3600.0},
        "spark": {"engine": "arrow"}})


def env_for(tmp: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC")}
    return base | {"LAMBDAREC__LAKE__ROOT": str(tmp / "lake"),
                   "LAMBDAREC__MODEL__DIR": str(tmp / "models"),
                   "LAMBDAREC__SERVER__WAL_DIR": str(tmp / "wal")}


def events() -> list[dict[str, Any]]:
    """Four events per user and day: every bronze file holds every user (a delete of one
    user rewrites it)."""
    return [{"event_id": f"e-{d:%d}-{u}-{n}", "user_id": u, "item_id": f"i{n}",
             "event_type": "view", "ts": d - timedelta(minutes=n), "session_id": f"s-{u}",
             "properties": {"n": n}}
            for d in DAYS for u in USERS for n in range(4)]


def catalog_rows(lake: Lake) -> None:
    """Rows for every other table, written the way the batch jobs write them."""
    lake.append("gold_interactions", pa.Table.from_pylist([
        {"user_id": u, "item_id": f"i{n}", "confidence": 1.0 + n, "n_events": 2,
         "last_ts": NOW, "as_of": NOW.date()} for u in USERS for n in range(3)]))
    for table, id_col in (("user_factors", "user_id"), ("item_factors", "item_id")):
        ids = USERS if id_col == "user_id" else [f"i{n}" for n in range(4)]
        lake.append(table, pa.table({id_col: list(ids), "factors": [[0.5, 0.25]] * len(ids),
                                     "model_version": ["v1"] * len(ids)},
                                    schema=TABLES[table].schema))
    lake.append("model_runs", pa.Table.from_pylist([
        {"model_version": v, "created_at": NOW, "as_of": NOW.date(), "backend": "implicit",
         "params": "{}", "metrics": None, "status": "published", "gate_reason": None,
         "bundle_path": None} for v in ("v1", "v2")], schema=TABLES["model_runs"].schema))
    lake.upsert("items", pa.Table.from_pylist([
        {"item_id": f"i{n}", "category": f"c{n % 2}", "price": 1.5 * n, "available": True,
         "title": f"Item {n}", "updated_at": NOW} for n in range(4)], schema=ITEMS.schema))


# A filtered read per table on a string column, with the answer known from the rows above.
FILTERS: dict[str, tuple[tuple[str, str, str], int]] = {
    "bronze_events": (("user_id", "=", "u0"), 8),
    "silver_events": (("user_id", "=", "u0"), 8),
    "gold_interactions": (("user_id", "=", "u2"), 3),
    "items": (("category", "=", "c1"), 2),
    "model_runs": (("model_version", "=", "v2"), 1),
    "user_factors": (("user_id", "=", "u0"), 1),
    "item_factors": (("item_id", "=", "i3"), 1),
    "user_erasures": (("user_id", "=", VICTIM), 1),
}


def assert_declared(lake: Lake, name: str) -> None:
    """The table's Delta schema and every live data file's Arrow types are the catalog's."""
    spec = TABLES[name]
    dt = DeltaTable(str(lake.path(name)))
    assert pa.schema(dt.schema().to_arrow()) == spec.schema, name
    for uri in dt.file_uris():
        stored = pq.read_schema(uri.removeprefix("file://"))
        for f in stored:
            assert f.type == spec.schema.field(f.name).type, (name, uri, f)


def test_after_forget_user_purge_and_optimize_every_table_reads_filtered(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    lake = Lake.from_settings(settings.lake)
    with IngestPipeline(settings, lake) as p:
        assert len(p.ingest(events()).accepted) == 24
        p.flush()
        compact.run(settings)  # silver, from bronze
        catalog_rows(lake)
        counts = p.forget_user(VICTIM)
    assert counts["bronze_events"] == counts["silver_events"] == 8
    assert counts["gold_interactions"] == 3 and counts["user_factors"] == 1
    lake.upsert("items", pa.Table.from_pylist([  # a partial merge: only the price changes
        {"item_id": "i1", "price": 9.0, "available": False, "updated_at": NOW}],
        schema=ITEMS.schema), ["price"])

    purge = subprocess.run([sys.executable, "-m", "lake.erasure"], cwd=ROOT,
                           env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert purge.returncode == 0, purge.stderr
    for name in TABLES:
        lake.coalesce_small_files(name)

    for name, ((col, op, value), n) in FILTERS.items():
        # what the issue saw fail: delta-rs + pyarrow, filtered on a string column
        raw = DeltaTable(str(lake.path(name))).to_pyarrow_table(filters=[(col, op, value)])
        assert raw.num_rows == n, name
        assert lake.read(name, filters=[(col, op, value)]).num_rows == n, name
        assert lake.read(name, filters=pc.field(col) == value).num_rows == n, name
        assert_declared(lake, name)
    for name in ("bronze_events", "silver_events", "gold_interactions", "user_factors"):
        assert lake.read(name, filters=[("user_id", "=", VICTIM)]).num_rows == 0, name
    item = lake.read("items", filters=[("item_id", "=", "i1")]).to_pylist()
    assert [(r["price"], r["title"]) for r in item] == [(9.0, "Item 1")]


def old_bronze(lake: Lake) -> None:
    """Bronze as a lake written before this change held it: no tenant column, and a delete
    (delta-rs' own, as `Lake.delete` ran it) that stored its rewritten file as string_view."""
    path = str(lake.path("bronze_events"))
    rows = [dict(e, ts=e["ts"], received_at=e["ts"], value=None, properties=None,
                 event_date=e["ts"].date()) for e in events()]
    write_deltalake(path, pa.Table.from_pylist(rows, schema=pa.schema(EVENT_FIELDS)),
                    partition_by=["event_date"])
    DeltaTable(path).delete(f"user_id = '{VICTIM}'")
    items = pa.Table.from_pylist([{"item_id": f"i{n}", "category": "c", "price": 1.0,
                                   "available": True, "title": None, "updated_at": NOW}
                                  for n in range(3)], schema=ITEMS.schema)
    write_deltalake(str(lake.path("items")), items.slice(0, 1))
    (DeltaTable(str(lake.path("items"))).merge(items, "t.item_id = s.item_id", source_alias="s",
                                               target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())


def test_a_lake_written_before_reads_filtered_and_is_repaired_by_the_command(
        tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    old_bronze(lake)
    bronze = DeltaTable(str(lake.path("bronze_events")))
    with pytest.raises(pa.ArrowNotImplementedError):  # the precondition: delta-rs' own files
        bronze.to_pyarrow_table(filters=[("user_id", "=", "u0")])

    # reads work before any repair: the catalog's columns and types, tenant "" for old rows
    got = lake.read("bronze_events", columns=["event_id", "tenant"],
                    filters=[("user_id", "=", "u0")])
    assert got.schema == pa.schema([TABLES["bronze_events"].schema.field(c)
                                    for c in ("event_id", "tenant")])
    assert sorted(got.column("event_id").to_pylist()) == sorted(
        e["event_id"] for e in events() if e["user_id"] == "u0")
    assert set(got.column("tenant").to_pylist()) == {""}
    assert lake.read("bronze_events", filters=pc.field("tenant") == "").num_rows == 16
    assert lake.read("items", filters=[("item_id", "in", ["i0", "i2"])]).num_rows == 2
    before = {n: lake.read(n).sort_by("event_id" if n == "bronze_events" else "item_id")
              for n in ("bronze_events", "items")}
    version = lake.version("bronze_events")

    done = subprocess.run([sys.executable, "-m", "lake.repair"], cwd=ROOT,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bronze_events"]["columns_added"] == ["tenant", "recommendation_id"]
    assert report["bronze_events"]["files_rewritten"] >= 1
    assert report["items"]["files_rewritten"] >= 1

    for name, key in (("bronze_events", "event_id"), ("items", "item_id")):
        assert_declared(lake, name)
        assert lake.read(name).sort_by(key) == before[name]  # the same rows, declared types
    assert DeltaTable(str(lake.path("bronze_events"))).to_pyarrow_table(
        filters=[("user_id", "=", "u0")]).num_rows == 8
    # the swap changed no rows, as the log says: incremental compaction skips it
    assert changed_partition_values(lake.path("bronze_events"), version,
                                    lake.version("bronze_events"), "event_date") == set()
    again = subprocess.run([sys.executable, "-m", "lake.repair", "bronze_events", "items"],
                           cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True,
                           timeout=300)
    assert json.loads(again.stdout) == {
        "bronze_events": {"columns_added": [], "files_rewritten": 0},
        "items": {"columns_added": [], "files_rewritten": 0}}

    bad = subprocess.run([sys.executable, "-m", "lake.repair", "bronze"], cwd=ROOT,
                         env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "python -m lake.repair: error: unknown table 'bronze'; tables: bronze_events,")


def test_appends_to_a_table_without_a_catalog_column_add_it(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    old_bronze(lake)
    lake.append("bronze_events", pa.Table.from_pylist([{
        "event_id": "e-new", "user_id": "u9", "item_id": "i9", "event_type": "view",
        "ts": NOW, "received_at": NOW, "tenant": "shopA"}]))
    assert pa.schema(lake.delta("bronze_events").schema().to_arrow()) == \
        TABLES["bronze_events"].schema
    by_tenant = pc.value_counts(lake.read("bronze_events").column("tenant")).to_pylist()
    assert sorted((r["values"], r["counts"]) for r in by_tenant) == [("", 16), ("shopA", 1)]
    assert lake.read("bronze_events", filters=[("tenant", "=", "shopA")],
                     columns=["user_id"]).column("user_id").to_pylist() == ["u9"]


def test_deletes_racing_each_other_and_appends_keep_every_row_right(tmp_path: Path) -> None:
    """Two threads erase users while a third appends to the same partition: each delete's
    swap of its string_view files either lands on the snapshot it read or is retried, so
    no erased row comes back, no appended row is lost and every file stays declared."""
    import threading

    lake = Lake(tmp_path / "lake", commit_retries=50)
    day = NOW - timedelta(hours=2)
    erased = [f"u{n}" for n in range(6)]
    kept = [f"u{n}" for n in range(6, 12)]

    def rows(batch: int, users: list[str]) -> pa.Table:
        return pa.Table.from_pylist([
            {"event_id": f"b{batch}-{n}", "user_id": users[n % len(users)], "item_id": "i1",
             "event_type": "view", "ts": day, "received_at": day} for n in range(24)])

    for b in range(4):  # files holding everyone: both deleters rewrite each of them
        lake.append("bronze_events", rows(b, erased + kept))
    errors: list[BaseException] = []

    def run(fn: Any) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)
        t = threading.Thread(target=body)
        t.start()
        return t

    threads = [
        run(lambda: [lake.delete("bronze_events", f"user_id = '{u}'") for u in erased[0::2]]),
        run(lambda: [lake.delete("bronze_events", f"user_id = '{u}'") for u in erased[1::2]]),
        run(lambda: [lake.append("bronze_events", rows(b, kept)) for b in range(4, 12)]),
    ]
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = lake.read("bronze_events", columns=["event_id", "user_id"]).to_pylist()
    assert not {r["user_id"] for r in got} & set(erased)
    want = [f"b{b}-{n}" for b in range(4) for n in range(24) if n % 12 >= 6] + \
        [f"b{b}-{n}" for b in range(4, 12) for n in range(24)]
    assert sorted(r["event_id"] for r in got) == sorted(want)
    raw = DeltaTable(str(lake.path("bronze_events"))).to_pyarrow_table(
        filters=[("user_id", "=", "u7")])
    assert raw.num_rows == 4 * 2 + 8 * 4
    assert_declared(lake, "bronze_events")


def test_log_lines_holding_unicode_line_separators_are_read_whole(tmp_path: Path) -> None:
    """The Delta log keeps U+2028 / U+0085 unescaped inside its JSON strings (file stats of
    a title or id): reading a commit must split at newlines only."""
    lake = Lake(tmp_path / "lake")
    odd = "Line\u2028Sep\u2029Par\x85Nel"
    odd_id = "u\u2028\u2029x"  # ids take no controls (U+0085), these separators they do
    lake.upsert("items", pa.Table.from_pylist([
        {"item_id": odd, "category": "c", "price": 1.0, "available": True, "title": odd,
         "updated_at": NOW}], schema=ITEMS.schema))
    day = NOW - timedelta(hours=1)
    lake.append("bronze_events", pa.Table.from_pylist([
        {"event_id": f"e{n}", "user_id": user, "item_id": "i1", "event_type": "view",
         "ts": day, "received_at": day} for n, user in enumerate([odd_id, "u0", "u1"])]))
    before = lake.version("bronze_events")
    lake.delete("bronze_events", "user_id = 'u1'")
    assert changed_partition_values(lake.path("bronze_events"), before,
                                    lake.version("bronze_events"), "event_date") == \
        {day.date().isoformat()}
    for name, col, value in (("items", "title", odd), ("bronze_events", "user_id", odd_id)):
        raw = DeltaTable(str(lake.path(name))).to_pyarrow_table(filters=[(col, "=", value)])
        assert raw.num_rows == 1, name
        assert_declared(lake, name)
