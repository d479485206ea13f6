"""The delta-rs lake: schema enforcement, time travel, concurrent writers, clean exits."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from lake.schemas import TABLES
from lake.tables import Lake, LakeError
from lake.validation import EventValidationError, events_to_table

ROOT = Path(__file__).resolve().parent.parent
D1, D2, D3 = date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)


def ev(i: int, d: date, etype: str = "view", value: float | None = None) -> dict:
    return {"event_id": f"e{i:03d}", "user_id": f"u{i % 3}", "item_id": f"i{i % 5}",
            "event_type": etype, "value": value,
            "ts": datetime(d.year, d.month, d.day, 10, i % 60, 0, 250_000, tzinfo=UTC)}


def good_batch() -> pa.Table:
    """Five valid events, rows 0..4; tests break exactly one field of row 2."""
    return events_to_table([ev(i, D1) for i in range(5)])


def _replace(table: pa.Table, name: str, values: list, typ: pa.DataType | None = None) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, name, pa.array(values, typ or table.schema.field(name).type))


def _seeded(lake: Lake) -> tuple[int, int]:
    lake.append("bronze_events", events_to_table([ev(100 + i, D2) for i in range(3)]))
    return lake.version("bronze_events"), lake.count("bronze_events")


# -- schema enforcement ------------------------------------------------------------------
def _bad_wrong_type(t: pa.Table) -> pa.Table:
    return _replace(t, "value", ["1.0", "2.5", "lots", None, "3"], pa.string())


def _bad_missing_required(t: pa.Table) -> pa.Table:
    return _replace(t, "user_id", ["u0", "u1", None, "u0", "u1"], pa.string())


def _bad_event_type(t: pa.Table) -> pa.Table:
    return _replace(t, "event_type", ["view", "click", "teleport", "view", "view"])


def _bad_nan(t: pa.Table) -> pa.Table:
    return _replace(t, "value", [1.0, None, math.nan, 2.0, None], pa.float64())


def _bad_timestamp(t: pa.Table) -> pa.Table:
    ts = t.column("ts").to_pylist()
    ts[2] = datetime(1970, 1, 20, 3, 0, tzinfo=UTC)  # epoch seconds read as ms: garbage
    return _replace(t, "ts", ts)


def _bad_future(t: pa.Table) -> pa.Table:
    ts = t.column("ts").to_pylist()
    ts[2] = datetime(2999, 1, 1, tzinfo=UTC)
    return _replace(t, "ts", ts)


@pytest.mark.parametrize(
    ("corrupt", "field", "words"),
    [
        (_bad_wrong_type, "value", "expected double"),
        (_bad_missing_required, "user_id", "required"),
        (_bad_event_type, "event_type", "teleport"),
        (_bad_nan, "value", "finite"),
        (_bad_timestamp, "ts", "outside"),
        (_bad_future, "ts", "outside"),
    ],
)
def test_bad_event_rejected_naming_row_and_field(lake: Lake, corrupt, field: str, words: str):
    version, rows = _seeded(lake)
    with pytest.raises(EventValidationError) as err:
        lake.append("bronze_events", corrupt(good_batch()))
    assert (err.value.row, err.value.field) == (2, field)
    assert f"row 2, field '{field}'" in str(err.value)
    assert words in str(err.value)
    assert lake.version("bronze_events") == version
    assert lake.count("bronze_events") == rows == 3


def test_missing_required_column_and_unknown_column(lake: Lake) -> None:
    version, _ = _seeded(lake)
    with pytest.raises(EventValidationError, match="'item_id'"):
        lake.append("bronze_events", good_batch().drop_columns(["item_id"]))
    with pytest.raises(EventValidationError, match="'colour'.*unknown"):
        lake.append("bronze_events", good_batch().append_column("colour", pa.array(["red"] * 5)))
    assert lake.version("bronze_events") == version


def test_dict_events_validated_one_by_one() -> None:
    events = [ev(0, D1), ev(1, D1, "rating", 4.5), {**ev(2, D1), "value": float("inf")}]
    with pytest.raises(EventValidationError) as err:
        events_to_table(events)
    assert (err.value.row, err.value.field) == (2, "value")
    with pytest.raises(EventValidationError) as err:
        events_to_table([ev(0, D1), {k: v for k, v in ev(1, D1).items() if k != "item_id"}])
    assert (err.value.row, err.value.field) == (1, "item_id")


def test_non_event_table_schema_enforced(lake: Lake) -> None:
    ok = pa.table({"item_id": ["a"], "category": ["c"], "price": [9.5], "available": [True],
                   "title": ["A"], "updated_at": pa.array([datetime(2024, 1, 1, tzinfo=UTC)],
                                                         pa.timestamp("us", tz="UTC"))})
    v = lake.upsert("items", ok)
    with pytest.raises(LakeError, match=r"items\.price: expected double"):
        lake.append("items", ok.set_column(2, "price", pa.array(["cheap"])))
    with pytest.raises(LakeError, match="required column 'available'"):
        lake.append("items", ok.drop_columns(["available"]))
    assert lake.version("items") == v
    assert lake.read("items").to_pylist()[0]["price"] == 9.5


# -- time travel, partitions -------------------------------------------------------------
def test_time_travel_and_partition_overwrite(lake: Lake) -> None:
    v1 = lake.append("bronze_events", events_to_table([ev(i, d) for i, d in
                                                       enumerate([D1, D1, D2, D2, D3])]))
    v2 = lake.overwrite("bronze_events", events_to_table([ev(50, D2, "purchase")]),
                        partitions=[{"event_date": D2}])
    assert v2 == v1 + 1
    ids = lambda t: sorted(t.column("event_id").to_pylist())  # noqa: E731
    assert ids(lake.read("bronze_events")) == ["e000", "e001", "e004", "e050"]
    assert ids(lake.read("bronze_events", version=v1)) == ["e000", "e001", "e002", "e003", "e004"]
    assert lake.read("bronze_events", filters=[("event_date", "=", D2)]).num_rows == 1
    assert lake.count("bronze_events", version=v1) == 5
    with pytest.raises(LakeError, match="outside the partitions"):
        lake.overwrite("bronze_events", events_to_table([ev(60, D1)]),
                       partitions=[{"event_date": D2}])
    with pytest.raises(LakeError, match="has no version 99: its versions go up to "):
        lake.read("bronze_events", version=99)
    assert lake.read("user_factors").schema == TABLES["user_factors"].schema  # missing: empty


@pytest.mark.slow
def test_summary_and_old_version_read_exit_cleanly(tmp_path: Path) -> None:
    """Regression: append, overwrite a partition, summary(), read(version=1) aborted at exit
    with "terminate called without an active exception" (exit 134)."""
    script = textwrap.dedent("""
        from datetime import UTC, date, datetime
        from lake.tables import Lake
        from lake.validation import events_to_table
        def ev(i, d):
            return {"event_id": f"e{i}", "user_id": "u", "item_id": "i", "event_type": "view",
                    "ts": datetime(2024, 1, d, 12, tzinfo=UTC)}
        import sys
        lake = Lake(sys.argv[1])
        lake.append("bronze_events", events_to_table([ev(i, 1 + i % 2) for i in range(4)]))
        lake.overwrite("bronze_events", events_to_table([ev(9, 1)]),
                       partitions=[{"event_date": date(2024, 1, 1)}])
        print(lake.summary()[0]["rows"], lake.read("bronze_events", version=1).num_rows,
              lake.read("bronze_events").num_rows)
    """)
    for k in range(3):  # the abort was intermittent
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"lake{k}")],
                             cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["3", "4", "3"]
        assert "terminate called" not in out.stderr


# -- concurrency -------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime
    from lake.tables import Lake
    from lake.validation import events_to_table
    root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lake = Lake(root, commit_retries=30)
    for b in range(n):
        lake.append("bronze_events", events_to_table([
            {"event_id": f"{tag}-{b}-{k}", "user_id": tag, "item_id": f"i{k}",
             "event_type": "click", "ts": datetime(2024, 5, 1 + k, 8, tzinfo=UTC)}
            for k in range(2)]))
""")


@pytest.mark.slow
def test_concurrent_appends_from_two_processes_all_land(lake: Lake) -> None:
    lake.ensure("bronze_events")
    n = 6
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(lake.root), tag, str(n)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    got = lake.read("bronze_events")
    expected = sorted(f"{t}-{b}-{k}" for t in "ab" for b in range(n) for k in range(2))
    assert sorted(got.column("event_id").to_pylist()) == expected
    assert lake.version("bronze_events") == 2 * n  # version 0 = create, one commit per batch


DELETE_RACER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime
    from lake.tables import Lake
    from lake.validation import events_to_table
    root, n = sys.argv[1], int(sys.argv[2])
    lake = Lake(root, commit_retries=60)
    print("ready", flush=True)
    for b in range(n):
        lake.append("bronze_events", events_to_table([
            {"event_id": f"x-{b}", "user_id": "x", "item_id": "i", "event_type": "click",
             "ts": datetime(2024, 5, 1, 8, tzinfo=UTC)}]))
""")


@pytest.mark.slow
def test_delete_retries_when_another_writer_commits_first(lake: Lake) -> None:
    """ForgetUser's deletes race the ingest flushes: a delete whose commit loses the race
    (the other writer added rows its predicate matches) is redone on the new snapshot, not
    failed."""
    lake.append("bronze_events", events_to_table([
        {"event_id": f"{u}-0", "user_id": u, "item_id": "i", "event_type": "click",
         "ts": datetime(2024, 5, 1, 8, tzinfo=UTC)} for u in ("x", "y")]))
    racer = subprocess.Popen([sys.executable, "-c", DELETE_RACER, str(lake.root), "60"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    deletes = 0
    while racer.poll() is None:
        lake.delete("bronze_events", "user_id = 'x'")
        deletes += 1
    _, err = racer.communicate(timeout=120)
    assert racer.returncode == 0, err[-2000:]
    assert lake.commit_conflicts > 0, f"no delete of {deletes} raced a commit"
    lake.delete("bronze_events", "user_id = 'x'")
    assert lake.read("bronze_events").column("user_id").to_pylist() == ["y"]
