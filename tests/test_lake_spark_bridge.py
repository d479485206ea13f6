"""Spark <-> Delta through lake.spark_bridge: round trips, partition overwrite, time travel,
schema enforcement, and files any Delta reader (delta-rs, Polars, a fresh process) reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake.schemas import BRONZE_EVENTS, MODEL_RUNS
from lake.spark_bridge import SchemaMismatchError, read_table, spark_schema, write_table
from lake.tables import Lake, LakeError
from lake.validation import events_to_table

pytestmark = pytest.mark.slow  # needs the JVM: the session alone takes ~6 s to start

ROOT = Path(__file__).resolve().parent.parent
D1, D2, D3 = date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)
RECEIVED = datetime(2024, 3, 4, 0, 0, 0, 1, tzinfo=UTC)

# (event_id, user_id, item_id, event_type, value, ts, session_id): the known answer.
EVENTS = [
    ("e1", "u1", "i1", "view", None, datetime(2024, 3, 1, 0, 0, 0, 1, tzinfo=UTC), "s1"),
    ("e2", "u1", "i2", "purchase", 19.99, datetime(2024, 3, 1, 23, 59, 59, 999999, tzinfo=UTC),
     None),
    ("e3", "u2", "i1", "rating", 4.5, datetime(2024, 3, 2, 12, 30, tzinfo=UTC), "s2"),
    ("e4", "u2", "i3", "click", None, datetime(2024, 3, 2, 13, 0, tzinfo=UTC), "s2"),
    ("e5", "u3", "i2", "add_to_cart", 2.0, datetime(2024, 3, 3, 8, 15, 30, 500, tzinfo=UTC),
     None),
]
BRONZE_SPARK = ("struct<event_id:string,user_id:string,item_id:string,event_type:string,"
                "value:double,ts:timestamp,received_at:timestamp,session_id:string,"
                "properties:string,event_date:date,tenant:string,recommendation_id:string>")
COLS = ["event_id", "user_id", "item_id", "event_type", "value", "ts", "session_id"]


def _micros(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def expected_rows(events=EVENTS) -> list[tuple]:
    """(event_id, user_id, item_id, event_type, value, ts µs, session_id, event_date)."""
    return sorted((e[0], e[1], e[2], e[3], e[4], _micros(e[5]), e[6], e[5].date().isoformat())
                  for e in events)


def events_arrow(events=EVENTS) -> pa.Table:
    return events_to_table([dict(zip(COLS, e, strict=True)) | {"received_at": RECEIVED}
                            for e in events], now=datetime(2024, 3, 5, tzinfo=UTC))


def events_df(spark, events=EVENTS):
    rows = [(*e[:6], RECEIVED, e[6], None, e[5].date(), "", "") for e in events]
    return spark.createDataFrame(rows, spark_schema(BRONZE_EVENTS))


def spark_rows(df) -> list[tuple]:
    from pyspark.sql import functions as F

    out = df.select(*COLS[:5], F.unix_micros("ts").alias("ts"), "session_id",
                    F.date_format("event_date", "yyyy-MM-dd").alias("event_date"))
    return sorted(tuple(r) for r in out.collect())


def arrow_rows(t: pa.Table) -> list[tuple]:
    return sorted((r["event_id"], r["user_id"], r["item_id"], r["event_type"], r["value"],
                   _micros(r["ts"]), r["session_id"], r["event_date"].isoformat())
                  for r in t.to_pylist())


def data_files(lake: Lake, name: str) -> set[str]:
    return {str(p.relative_to(lake.path(name))) for p in lake.path(name).rglob("*.parquet")}


# -- reading delta-rs tables -------------------------------------------------------------
def test_read_table_restores_partitions_and_timestamps(spark, lake: Lake) -> None:
    lake.append("bronze_events", events_arrow())
    df = read_table(spark, lake, "bronze_events")
    assert df.schema.simpleString() == BRONZE_SPARK  # names, order and types of the catalog
    assert spark_rows(df) == expected_rows()
    assert df.filter("event_date = '2024-03-02'").count() == 2
    # a missing table reads as empty with the catalog schema
    empty = read_table(spark, lake, "gold_interactions")
    assert empty.count() == 0 and empty.columns[-1] == "as_of"
    # an existing table with no files yet, read with a partition filter (compaction of a
    # fresh lake does exactly this)
    lake.ensure("silver_events")
    assert read_table(spark, lake, "silver_events",
                      partition_filter="event_date >= '2024-03-01'").count() == 0


def test_read_table_time_travel(spark, lake: Lake) -> None:
    v1 = lake.append("bronze_events", events_arrow(EVENTS[:2]))
    v2 = lake.append("bronze_events", events_arrow(EVENTS[2:]))
    assert spark_rows(read_table(spark, lake, "bronze_events", version=v1)) == \
        expected_rows(EVENTS[:2])
    assert read_table(spark, lake, "bronze_events", version=v2).count() == 5
    assert read_table(spark, lake, "bronze_events", version=0).count() == 0
    with pytest.raises(LakeError, match="has no version 42: its versions go up to "):
        read_table(spark, lake, "bronze_events", version=42)
    pruned = read_table(spark, lake, "bronze_events", partition_filter="event_date >= '2024-03-02'")
    assert sorted(r.event_id for r in pruned.select("event_id").collect()) == ["e3", "e4", "e5"]


# -- writing -----------------------------------------------------------------------------
def test_write_then_read_everywhere_identical(spark, lake: Lake) -> None:
    v = write_table(events_df(spark), lake, "bronze_events", mode="append")
    assert v == 1  # version 0 = create
    assert lake.count("bronze_events") == 5  # numRecords stats committed
    assert arrow_rows(lake.read("bronze_events")) == expected_rows()  # delta-rs
    assert spark_rows(read_table(spark, lake, "bronze_events")) == expected_rows()  # Spark
    assert not (lake.path("bronze_events") / "_staging").exists()
    # Hive layout like delta-rs' own; the partition column is not inside the files
    files = sorted(data_files(lake, "bronze_events"))
    assert [f.split("/")[0] for f in files] == ["event_date=2024-03-01", "event_date=2024-03-02",
                                                "event_date=2024-03-03"]
    assert "event_date" not in pq.read_schema(lake.path("bronze_events") / files[0]).names

    import polars as pl

    pdf = pl.read_delta(str(lake.path("bronze_events"))).sort("event_id")
    assert arrow_rows(pdf.to_arrow()) == expected_rows()

    script = textwrap.dedent("""
        import json, sys
        import pyarrow as pa
        from deltalake import DeltaTable, QueryBuilder
        dt = DeltaTable(sys.argv[1])
        t = pa.table(QueryBuilder().register("t", dt).execute(
            "SELECT event_id, user_id, item_id, event_type, value, ts, session_id, event_date "
            "FROM t ORDER BY event_id").read_all())
        print(json.dumps({"version": dt.version(), "rows": [
            [r["event_id"], r["user_id"], r["item_id"], r["event_type"], r["value"],
             r["ts"].isoformat(), r["session_id"], r["event_date"].isoformat()]
            for r in t.to_pylist()]}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(lake.path("bronze_events"))],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout)
    assert fresh["version"] == 1
    assert fresh["rows"] == [[e[0], e[1], e[2], e[3], e[4], e[5].isoformat(), e[6],
                              e[5].date().isoformat()] for e in sorted(EVENTS)]


def test_a_write_sweeps_staging_left_by_a_dead_writer(spark, lake: Lake) -> None:
    import time

    lake.ensure("bronze_events")
    base = lake.path("bronze_events") / "_staging"
    two_days_ago = int((time.time() - 2 * 86400) * 1000)
    stale = base / f"{two_days_ago}-deadbeef"
    running = base / f"{int(time.time() * 1000)}-cafe"  # a concurrent writer's, in use
    for d in (stale, running):
        (d / "event_date=2024-03-01").mkdir(parents=True)
        (d / "event_date=2024-03-01" / "part-0.parquet").write_bytes(b"x")
    write_table(events_df(spark), lake, "bronze_events", mode="append")
    assert not stale.exists() and running.exists()
    assert lake.count("bronze_events") == 5  # the leftovers were never part of the table


def test_overwrite_one_partition_leaves_others(spark, lake: Lake) -> None:
    write_table(events_df(spark), lake, "bronze_events", mode="append")
    before = data_files(lake, "bronze_events")
    v_old = lake.version("bronze_events")
    new = [("e9", "u9", "i9", "purchase", 5.0, datetime(2024, 3, 2, 18, tzinfo=UTC), None)]
    v = write_table(events_df(spark, new), lake, "bronze_events", mode="overwrite",
                    partitions=[{"event_date": D2}])
    assert v == v_old + 1
    expected = expected_rows([e for e in EVENTS if e[5].date() != D2] + new)
    assert arrow_rows(lake.read("bronze_events")) == expected
    assert spark_rows(read_table(spark, lake, "bronze_events")) == expected
    active = {a.split("/")[0] for a in
              pa.table(lake.delta("bronze_events").get_add_actions(flatten=True))
              .column("path").to_pylist()}
    assert active == {"event_date=2024-03-01", "event_date=2024-03-02", "event_date=2024-03-03"}
    kept = {f for f in before if not f.startswith("event_date=2024-03-02")}
    assert kept <= data_files(lake, "bronze_events")  # D1/D3 files untouched
    # the old version is still there
    assert spark_rows(read_table(spark, lake, "bronze_events", version=v_old)) == expected_rows()
    # rerun of the same partition rewrite: same result, one more version
    write_table(events_df(spark, new), lake, "bronze_events", mode="overwrite",
                partitions=[{"event_date": D2}])
    assert arrow_rows(lake.read("bronze_events")) == expected
    # an empty rewrite empties just that partition
    write_table(events_df(spark, new).limit(0), lake, "bronze_events", mode="overwrite",
                partitions=[{"event_date": D2}])
    assert arrow_rows(lake.read("bronze_events")) == expected_rows(
        [e for e in EVENTS if e[5].date() != D2])


def test_rejected_writes_commit_nothing(spark, lake: Lake) -> None:
    from pyspark.sql import functions as F

    write_table(events_df(spark), lake, "bronze_events", mode="append")
    version, files = lake.version("bronze_events"), data_files(lake, "bronze_events")
    good = events_df(spark)

    with pytest.raises(SchemaMismatchError, match=r"bronze_events\.value: expected double, "
                                                  r"got string"):
        write_table(good.withColumn("value", F.lit("x")), lake, "bronze_events", mode="append")
    with pytest.raises(SchemaMismatchError, match="required column 'user_id' is missing"):
        write_table(good.drop("user_id"), lake, "bronze_events", mode="append")
    with pytest.raises(SchemaMismatchError, match=r"unknown column\(s\) \['colour'\]"):
        write_table(good.withColumn("colour", F.lit("red")), lake, "bronze_events",
                    mode="append")
    with pytest.raises(SchemaMismatchError, match="TIMESTAMP_NTZ"):
        write_table(good.withColumn("ts", F.col("ts").cast("timestamp_ntz")), lake,
                    "bronze_events", mode="append")
    # nulls in a required column are found in the written files' footers, before the commit
    nulls = good.withColumn("user_id", F.when(F.col("event_id") == "e3", None)
                            .otherwise(F.col("user_id")))
    with pytest.raises(LakeError, match=r"bronze_events\.user_id: 1 null value"):
        write_table(nulls, lake, "bronze_events", mode="append")
    with pytest.raises(LakeError, match="outside the partitions"):
        write_table(good, lake, "bronze_events", mode="overwrite",
                    partitions=[{"event_date": D1}])
    with pytest.raises(ValueError, match="mode"):
        write_table(good, lake, "bronze_events", mode="upsert")  # type: ignore[arg-type]
    assert lake.version("bronze_events") == version
    assert data_files(lake, "bronze_events") == files  # no stray files
    assert not (lake.path("bronze_events") / "_staging").exists()


def test_an_arrow_table_is_written_and_rejected_like_a_dataframe(spark, lake: Lake) -> None:
    """The Arrow engine's writes: same partition overwrite, same checks, same one commit."""
    write_table(events_arrow(), lake, "bronze_events", mode="append")
    assert arrow_rows(lake.read("bronze_events")) == expected_rows()
    assert spark_rows(read_table(spark, lake, "bronze_events")) == expected_rows()
    version, files = lake.version("bronze_events"), data_files(lake, "bronze_events")

    new = [("e9", "u9", "i9", "purchase", 5.0, datetime(2024, 3, 2, 18, tzinfo=UTC), None)]
    v = write_table(events_arrow(new), lake, "bronze_events", mode="overwrite",
                    partitions=[{"event_date": D2}])
    assert v == version + 1
    assert arrow_rows(lake.read("bronze_events")) == expected_rows(
        [e for e in EVENTS if e[5].date() != D2] + new)
    assert {f for f in files if not f.startswith("event_date=2024-03-02")} <= \
        data_files(lake, "bronze_events")  # D1/D3 files untouched

    good = events_arrow()
    with pytest.raises(LakeError, match=r"unknown column\(s\) \['colour'\]"):
        write_table(good.append_column("colour", pa.array(["red"] * good.num_rows)), lake,
                    "bronze_events", mode="append")
    with pytest.raises(LakeError, match="required column 'user_id' is missing"):
        write_table(good.drop_columns(["user_id"]), lake, "bronze_events", mode="append")
    with pytest.raises(LakeError, match="outside the partitions"):
        write_table(good, lake, "bronze_events", mode="overwrite",
                    partitions=[{"event_date": D1}])
    assert lake.version("bronze_events") == v
    assert not (lake.path("bronze_events") / "_staging").exists()


def test_factor_table_round_trip_with_escaped_partition_values(spark, lake: Lake) -> None:
    """Arrays, an unpartitioned table and partition values that need escaping on disk."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    odd = "2024-03-01T12:00:00 run/7%"
    schema = StructType([StructField("user_id", StringType()),
                         StructField("factors", ArrayType(FloatType())),
                         StructField("model_version", StringType())])
    rows = [("u1", [0.5, -1.25], odd), ("u2", [2.0, 0.0], odd), ("u3", [1.0, 1.0], "007")]
    write_table(spark.createDataFrame(rows, schema), lake, "user_factors", mode="append")
    got = sorted(tuple(r.values()) for r in lake.read("user_factors").to_pylist())
    assert got == sorted((u, f, m) for u, f, m in rows)
    back = read_table(spark, lake, "user_factors")
    assert sorted((r.user_id, r.factors, r.model_version) for r in back.collect()) == got
    # delta-rs writes the same table the other way round; Spark reads it back
    lake.append("user_factors", pa.table({
        "user_id": ["u4"], "factors": pa.array([[3.0, 4.0]], pa.list_(pa.float32())),
        "model_version": ["v a:b"]}))
    assert read_table(spark, lake, "user_factors").filter("model_version = 'v a:b'").count() == 1
    pruned = read_table(spark, lake, "user_factors", partition_filter=f"model_version = '{odd}'")
    assert sorted(r.user_id for r in pruned.collect()) == ["u1", "u2"]
    # unpartitioned table
    runs = spark.createDataFrame(
        [("m1", datetime(2024, 3, 1, 1, tzinfo=UTC), D1, "implicit", "{}", None, "published",
          None, None)], spark_schema(MODEL_RUNS))
    write_table(runs, lake, "model_runs", mode="overwrite")
    assert lake.read("model_runs").column("as_of").to_pylist() == [D1]
    assert read_table(spark, lake, "model_runs").first().backend == "implicit"


def test_files_outside_hive_dirs_get_partition_values_from_the_log(spark, lake: Lake) -> None:
    """A file whose directory does not spell its partition value is still read correctly."""
    from deltalake.transaction import AddAction

    dt = lake.ensure("item_factors")
    loose = lake.path("item_factors") / "loose" / "f.parquet"
    loose.parent.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": ["i1", "i2"],
                             "factors": pa.array([[1.0], [2.0]], pa.list_(pa.float32()))}), loose)
    dt.create_write_transaction(
        [AddAction(path="loose/f.parquet", size=os.path.getsize(loose),
                   partition_values={"model_version": "v9"}, modification_time=0,
                   data_change=True, stats=json.dumps({"numRecords": 2}))],
        mode="append", schema=dt.schema(), partition_by=["model_version"])
    df = read_table(spark, lake, "item_factors")
    assert sorted((r.item_id, r.model_version) for r in df.collect()) == [("i1", "v9"),
                                                                           ("i2", "v9")]


def test_a_failure_after_the_commit_keeps_the_committed_files(spark, lake: Lake,
                                                             monkeypatch) -> None:
    """Fault injection: the commit lands, then the call fails (e.g. a lost connection)."""
    from deltalake import DeltaTable

    real = DeltaTable.create_write_transaction

    def commit_then_fail(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise RuntimeError("connection lost after the commit")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_then_fail)
    with pytest.raises(RuntimeError, match="after the commit"):
        write_table(events_df(spark), lake, "bronze_events", mode="append")
    monkeypatch.undo()
    # the commit is in the log and every file it references is still there
    assert lake.count("bronze_events") == len(EVENTS)
    assert sorted(spark_rows(read_table(spark, lake, "bronze_events"))) == \
        sorted(expected_rows())


def test_write_returns_its_own_commit_version(spark, lake: Lake, monkeypatch) -> None:
    """Another writer commits right after us: we still report our commit's version."""
    from deltalake import DeltaTable

    write_table(events_df(spark), lake, "bronze_events", mode="append")
    before = lake.version("bronze_events")
    real = DeltaTable.create_write_transaction

    def commit_then_other_writer(self, *args, **kwargs):
        real(self, *args, **kwargs)
        lake.append("bronze_events", events_arrow())  # the concurrent writer

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_then_other_writer)
    v = write_table(events_df(spark), lake, "bronze_events", mode="append")
    assert v == before + 1 and lake.version("bronze_events") == before + 2


def test_tasks_write_one_file_per_partition_value_in_hive_directories(spark, tmp_path):
    from urllib.parse import unquote

    from lake.spark_bridge import HIVE_NULL, write_staged

    keys = ["a", "b/c", "50% off", None]
    rows = [(keys[i % 4], i) for i in range(40)]
    df = spark.createDataFrame(rows, "k string, n long").repartition(3)  # rows of 3 tasks
    files = write_staged(df, tmp_path, ["k"])
    found: dict[str | None, list[int]] = {}
    written = sorted(tmp_path.rglob("*.parquet"))
    assert files == len(written)
    for f in written:
        d = f.parent.relative_to(tmp_path)
        assert len(d.parts) == 1 and d.parts[0].startswith("k=")
        raw = d.parts[0][2:]
        key = None if raw == HIVE_NULL else unquote(raw)
        t = pq.read_table(f)
        assert t.column_names == ["n"]  # the partition column lives in the directory only
        found.setdefault(key, []).extend(t.column("n").to_pylist())
    assert {k: sorted(v) for k, v in found.items()} == {
        k: [n for kk, n in rows if kk == k] for k in keys}
    assert len(written) <= 3 * len(keys)  # at most one file per task and value


def test_a_dataframe_without_the_tenant_stores_its_default(spark, lake: Lake) -> None:
    """Writers store a column's default (bronze's tenant and recommendation_id ""), never a
    null for it."""
    df = events_df(spark).drop("tenant", "recommendation_id")
    write_table(df, lake, "bronze_events", mode="append")
    for f in data_files(lake, "bronze_events"):
        for name in ("tenant", "recommendation_id"):
            stored = pq.read_table(lake.path("bronze_events") / f, columns=[name])
            assert stored.column(name).null_count == 0
            assert set(stored.column(name).to_pylist()) == {""}
