"""IngestPipeline on real files: a real WAL directory and a real Delta lake under tmp_path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from lake.config import Settings, load_settings
from lake.tables import Lake
from online.ingest import REC_FORGET, IngestError, IngestOverloadedError, IngestPipeline
from online.wal import WriteAheadLog

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=123456)


def make_settings(tmp: Path, **server: Any) -> Settings:
    srv = {"wal_dir": str(tmp / "wal"), "flush_interval_s": 3600.0, "wal_fsync_interval_ms": 1.0}
    srv.update(server)
    return load_settings(env={}, overrides={"lake": {"root": str(tmp / "lake")}, "server": srv})


def ev(eid: str, user: str = "u1", item: str = "i1", etype: str = "view", **kw: Any) -> dict:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype,
            "ts": kw.pop("ts", NOW.isoformat()), **kw}


def bronze_ids(lake: Lake) -> list[str]:
    return lake.read("bronze_events", columns=["event_id"]).column("event_id").to_pylist()


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path)
    lake = Lake(tmp_path / "lake")
    return settings, lake


def test_validation_rejects_bad_events_individually(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    with IngestPipeline(settings, lake) as p:
        batch = [
            ev("ok-1", value=2, properties={"price": 9.5}, session_id="s1"),
            ev("bad-ts", ts="yesterday"),
            ev("bad-type", etype="teleport"),
            {"event_id": "no-user", "item_id": "i", "event_type": "view", "ts": NOW.isoformat()},
            ev("bad-future", ts=(NOW + timedelta(days=3)).isoformat()),
            ev("x" * 300),
            ev("ok-2", etype="purchase"),
            ev("bad-extra", colour="red"),
        ]
        r = p.ingest(batch)
        assert [e["event_id"] for e in r.accepted] == ["ok-1", "ok-2"]
        assert r.duplicates == 0
        reasons = dict(r.rejected)
        assert sorted(reasons) == [1, 2, 3, 4, 5, 7]
        assert "'ts'" in reasons[1] and "ISO-8601" in reasons[1]
        assert "'event_type'" in reasons[2] and "teleport" in reasons[2]
        assert "'user_id'" in reasons[3] and "required" in reasons[3]
        assert "'ts'" in reasons[4]
        assert "'event_id'" in reasons[5] and "256" in reasons[5]
        assert "'colour'" in reasons[7]
        a = r.accepted[0]  # normalised to bronze columns
        assert set(a) == {"event_id", "user_id", "item_id", "event_type", "value", "ts",
                          "received_at", "session_id", "properties", "event_date", "tenant",
                      "recommendation_id"}
        assert a["tenant"] == ""  # no tenant given: the open port's, the console's
        assert a["value"] == 2.0 and a["properties"] == '{"price":9.5}'
        assert a["ts"] == NOW and a["event_date"] == NOW.date()
    rows = lake.read("bronze_events").sort_by("event_id").to_pylist()
    assert [r["event_id"] for r in rows] == ["ok-1", "ok-2"]
    assert rows[0]["ts"] == NOW and rows[0]["session_id"] == "s1"
    assert rows[0]["properties"] == '{"price":9.5}' and rows[1]["value"] is None


def test_dedupe_within_and_across_batches(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    with IngestPipeline(settings, lake) as p:
        r1 = p.ingest([ev("a"), ev("b"), ev("a"), ev("c"), ev("b")])
        assert [e["event_id"] for e in r1.accepted] == ["a", "b", "c"] and r1.duplicates == 2
        r2 = p.ingest([ev("c"), ev("d")])
        assert [e["event_id"] for e in r2.accepted] == ["d"] and r2.duplicates == 1
        p.flush()  # already in bronze: still a duplicate
        r3 = p.ingest([ev("a", item="other"), ev("d"), ev("e")])
        assert [e["event_id"] for e in r3.accepted] == ["e"] and r3.duplicates == 2
        # an invalid event is rejected, not counted as a duplicate
        r4 = p.ingest([ev("a", etype="nope")])
        assert r4.accepted == [] and r4.duplicates == 0 and len(r4.rejected) == 1
        st = p.stats()
        assert st["duplicates_total"] == 5 and st["accepted_total"] == 5
    assert sorted(bronze_ids(lake)) == ["a", "b", "c", "d", "e"]


def test_seen_set_is_bounded(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    with IngestPipeline(settings, lake, dedupe_max_ids=10) as p:
        p.ingest([ev(f"e{i}") for i in range(30)])
        assert p.stats()["seen_ids"] == 10
        assert p.ingest([ev("e29")]).duplicates == 1  # recent: still known


def test_flush_lands_events_exactly_once(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    p = IngestPipeline(settings, lake, node_id="n1")
    p.start()
    for b in range(3):
        p.ingest([ev(f"b{b}-{i}") for i in range(50)])
    assert p.stats()["pending_events"] == 150
    assert p.flush() == 150
    assert p.flush() == 0
    v = lake.version("bronze_events")
    st = p.stats()
    assert st["pending_events"] == 0 and st["flushed_total"] == 150
    assert lake.delta("bronze_events").transaction_version("lambdarec-wal-n1") == 3
    p.close()
    assert lake.version("bronze_events") == v  # nothing left to commit on close
    q = IngestPipeline(settings, lake, node_id="n1")
    q.start()
    q.close()
    ids = bronze_ids(lake)
    assert len(ids) == 150 and len(set(ids)) == 150


def test_background_flusher_by_size_and_interval(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, flush_interval_s=0.2, flush_max_events=100)
    lake = Lake(tmp_path / "lake")
    with IngestPipeline(settings, lake) as p:
        p.ingest([ev(f"e{i}") for i in range(10)])
        deadline = datetime.now() + timedelta(seconds=10)
        while p.stats()["pending_events"] and datetime.now() < deadline:
            threading.Event().wait(0.05)
        st = p.stats()
        assert st["pending_events"] == 0 and st["last_flush_time"] is not None
        assert st["ingest_lag_s"] == 0.0
        assert sorted(bronze_ids(lake)) == sorted(f"e{i}" for i in range(10))


def test_replay_after_commit_before_wal_trim_does_not_duplicate(env) -> None:  # type: ignore[no-untyped-def]
    """A crash after the Delta commit but before the WAL segments were deleted."""
    settings, lake = env
    wal_dir = settings.server.wal_dir
    p = IngestPipeline(settings, lake)
    p.start()
    p.ingest([ev(f"e{i}") for i in range(20)])
    p.ingest([ev(f"f{i}") for i in range(20)])
    snapshot = wal_dir.parent / "wal-copy"
    shutil.copytree(wal_dir, snapshot)  # the log as it was before the flush
    p.flush()
    p.close()
    shutil.rmtree(wal_dir)
    shutil.copytree(snapshot, wal_dir)  # restore it: as if the trim never happened
    q = IngestPipeline(settings, lake)
    q.start()
    assert q.stats()["replayed_events"] == 0  # the table's txn version says: all committed
    r = q.ingest([ev("e3"), ev("g1")])  # the retained log also rebuilt the seen-set
    assert r.duplicates == 1 and [e["event_id"] for e in r.accepted] == ["g1"]
    q.close()
    ids = bronze_ids(lake)
    assert len(ids) == 41 and len(set(ids)) == 41


CHILD = textwrap.dedent("""
    import json, os, sys
    from lake.config import load_settings
    from lake.tables import Lake
    from online.ingest import IngestPipeline
    spec = json.loads(sys.argv[1])
    s = load_settings(env={}, overrides=spec["settings"])
    p = IngestPipeline(s, Lake(spec["settings"]["lake"]["root"]))
    p.start()
    for batch in spec["batches"]:
        r = p.ingest(batch)
        print("ACK", json.dumps([e["event_id"] for e in r.accepted]), flush=True)
    for user in spec.get("forget", []):
        print("FORGOT", json.dumps(p.forget_user(user)), flush=True)
    os._exit(0)  # no close(): like a crash, the log is all that is left
""")


def run_child(settings: Settings, batches: list[list[dict]], forget: list[str] = ()) -> list[str]:
    spec = {"settings": {"lake": {"root": str(settings.lake.root)},
                         "server": {"wal_dir": str(settings.server.wal_dir),
                                    "flush_interval_s": 3600.0}},
            "batches": batches, "forget": list(forget)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_dedupe_across_restart_from_retained_wal(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    lines = run_child(settings, [[ev(f"e{i}") for i in range(30)]])
    assert len(json.loads(lines[0][4:])) == 30
    with IngestPipeline(settings, lake) as p:
        assert p.stats()["replayed_events"] == 30
        r = p.ingest([ev("e0"), ev("e29"), ev("new")])
        assert r.duplicates == 2 and [e["event_id"] for e in r.accepted] == ["new"]
    ids = bronze_ids(lake)
    assert sorted(ids) == sorted([f"e{i}" for i in range(30)] + ["new"])


def _seed_user_tables(lake: Lake) -> None:
    ts = NOW
    today = ts.date()
    silver = pa.table({
        "event_id": ["s1", "s2", "s3"], "user_id": ["u1", "u2", "o'brien"],
        "item_id": ["i1", "i1", "i2"], "event_type": ["view"] * 3, "ts": [ts] * 3,
        "event_date": [today] * 3})
    lake.append("silver_events", silver)
    lake.append("gold_interactions", pa.table({
        "user_id": ["u1", "u2", "u1"], "item_id": ["i1", "i1", "i2"],
        "confidence": [1.0, 2.0, 3.0], "n_events": [1, 2, 3], "last_ts": [ts] * 3,
        "as_of": [today] * 3}))
    lake.append("user_factors", pa.table({
        "user_id": ["u1", "u2"], "factors": [[0.1, 0.2], [0.3, 0.4]],
        "model_version": ["v1", "v1"]}))


def users_in(lake: Lake, table: str) -> list[str]:
    return sorted(lake.read(table, columns=["user_id"]).column("user_id").to_pylist())


def test_forget_user_erases_lake_rows_and_pending_wal(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    _seed_user_tables(lake)
    p = IngestPipeline(settings, lake)
    p.start()
    p.ingest([ev("f1", "u1"), ev("f2", "u2"), ev("f3", "u1"), ev("q1", "o'brien")])
    p.flush()
    p.ingest([ev("p1", "u1"), ev("p2", "u2"), ev("p3", "u1")])  # pending in the WAL only
    counts = p.forget_user("u1")
    assert counts == {"bronze_events": 2, "silver_events": 1, "gold_interactions": 2,
                      "user_factors": 1, "gold_attributed_events": 0, "wal_pending": 2,
                      "bronze_impressions": 0, "impressions_pending": 0}
    assert p.stats()["pending_events"] == 1
    for table in ("bronze_events", "silver_events", "gold_interactions", "user_factors"):
        assert "u1" not in users_in(lake, table), table
    assert users_in(lake, "silver_events") == ["o'brien", "u2"]
    # a quote in the id is data, not SQL
    assert p.forget_user("o'brien")["bronze_events"] == 1
    assert p.forget_user("x' OR '1'='1")["bronze_events"] == 0
    assert users_in(lake, "silver_events") == ["u2"]
    # events after the erasure are new events and are kept
    p.ingest([ev("later", "u1")])
    p.close()
    assert sorted(bronze_ids(lake)) == ["f2", "later", "p2"]
    q = IngestPipeline(settings, lake)
    q.start()
    with pytest.raises(ValueError, match="user_id"):
        q.forget_user(" ")
    q.close()


def test_forget_user_leaves_none_of_their_events_in_the_wal_files(env) -> None:  # type: ignore[no-untyped-def]
    """The WAL's bytes held an erased user's acknowledged events until the segment filled
    (1 MB once flushed): now the flush after the erasure deletes them."""
    settings, lake = env
    wal_dir = Path(settings.server.wal_dir)

    def wal_bytes() -> bytes:
        return b"".join(f.read_bytes() for f in wal_dir.iterdir() if f.suffix == ".wal")

    p = IngestPipeline(settings, lake)
    p.start()
    p.ingest([ev("f1", "erased-user"), ev("f2", "u2")])
    p.flush()  # in bronze now: its WAL bytes went with the flush
    p.ingest([ev("p1", "erased-user"), ev("p2", "u2")])  # pending
    assert wal_bytes().count(b"erased-user") == 1
    p.forget_user("erased-user")
    p.ingest([ev("n1", "u3")])  # traffic after the erasure
    p.flush()
    assert b"erased-user" not in wal_bytes()
    p.close()
    assert sorted(bronze_ids(lake)) == ["f2", "n1", "p2"]


def test_forget_user_survives_a_crash_before_flush(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    lines = run_child(settings, [[ev("a1", "u1"), ev("b1", "u2")], [ev("a2", "u1")]],
                      forget=["u1"])
    assert json.loads(lines[-1][7:])["wal_pending"] == 2
    with IngestPipeline(settings, lake) as p:
        assert p.stats()["replayed_events"] == 1
    assert bronze_ids(lake) == ["b1"]  # the tombstone kept u1's pending events out


def test_replay_redoes_lake_deletes_of_an_uncommitted_tombstone(env) -> None:  # type: ignore[no-untyped-def]
    """Crash between the durable tombstone and the lake deletes: start() finishes the job."""
    settings, lake = env
    _seed_user_tables(lake)
    with IngestPipeline(settings, lake) as p:
        p.ingest([ev("a1", "u1"), ev("b1", "u2")])
    committed = lake.delta("bronze_events").transaction_version(p.app_id)
    wal = WriteAheadLog.open(settings.server.wal_dir, min_seq=committed + 1)
    wal.append(REC_FORGET, json.dumps({"user_id": "u1"}).encode())
    wal.close()
    with IngestPipeline(settings, lake) as p:
        pass
    for table in ("bronze_events", "silver_events", "gold_interactions", "user_factors"):
        assert "u1" not in users_in(lake, table), table
    assert bronze_ids(lake) == ["b1"]


def test_ingest_is_durable_under_concurrent_callers(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    threads, calls, per_call = 6, 25, 4
    with IngestPipeline(settings, lake) as p:
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for c in range(calls):
                    # every thread also re-sends one shared id: exactly one wins it
                    batch = [ev(f"t{t}-c{c}-{i}") for i in range(per_call)] + [ev(f"shared-{c}")]
                    r = p.ingest(batch)
                    assert len(r.accepted) + r.duplicates == per_call + 1
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        assert not errors, errors
        st = p.stats()
        assert st["accepted_total"] == threads * calls * per_call + calls
        assert st["duplicates_total"] == (threads - 1) * calls
        assert st["wal_fsyncs"] < threads * calls  # group commit shared fsyncs
    ids = bronze_ids(lake)
    assert len(ids) == len(set(ids)) == threads * calls * per_call + calls


def test_api_misuse(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    p = IngestPipeline(settings, lake)
    with pytest.raises(IngestError, match="not started"):
        p.ingest([ev("a")])
    p.start()
    with pytest.raises(ValueError, match="max_batch"):
        p.ingest([ev(f"e{i}") for i in range(settings.server.max_batch + 1)])
    with pytest.raises(RuntimeError, match="in use"):
        IngestPipeline(settings, lake).start()  # one owner per wal_dir
    p.close()
    with pytest.raises(IngestError, match="closed"):
        p.ingest([ev("a")])


def test_backpressure_when_bronze_falls_behind(env) -> None:  # type: ignore[no-untyped-def]
    settings, lake = env
    with IngestPipeline(settings, lake, max_pending_events=10) as p:
        p.ingest([ev(f"e{i}") for i in range(10)])
        with pytest.raises(IngestOverloadedError, match="retry later"):
            p.ingest([ev("one-more")])
        p.flush()
        assert [e["event_id"] for e in p.ingest([ev("one-more")]).accepted] == ["one-more"]
