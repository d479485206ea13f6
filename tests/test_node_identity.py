"""Ingest node identity: replicas on one lake each flush under their own id, nothing is lost.

Real WAL directories and a real Delta lake under tmp_path; a second process is a real
subprocess where the lock must hold across processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from lake.config import Settings, load_settings
from lake.tables import Lake
from online.ingest import IngestPipeline
from online.node_identity import LEGACY_NODE_ID, NODE_FILE, NodeIdentityError
from online.wal import WriteAheadLog
from tests.test_online_ingest import bronze_ids, ev

ROOT = Path(__file__).resolve().parent.parent


def replica(tmp: Path, name: str, **server: Any) -> Settings:
    srv = {"wal_dir": str(tmp / f"wal-{name}"), "flush_interval_s": 3600.0,
           "wal_fsync_interval_ms": 1.0, **server}
    return load_settings(env={}, overrides={"lake": {"root": str(tmp / "lake")}, "server": srv})


def test_two_replicas_on_one_lake_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    a = IngestPipeline(replica(tmp_path, "a"), lake)
    b = IngestPipeline(replica(tmp_path, "b"), lake)
    a.start()
    b.start()
    assert a.node_id != b.node_id  # each WAL directory made its own id
    sent: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str, p: IngestPipeline) -> None:
        try:
            for batch in range(20):
                ids = [f"{name}-{batch}-{i}" for i in range(25)]
                res = p.ingest([ev(e, user=f"{name}{i % 7}") for i, e in enumerate(ids)])
                sent[name] += [e["event_id"] for e in res.accepted]
                if batch % 3 == 0:
                    p.flush()  # interleaved commits of both replicas on one table
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(sent["a"]) == len(sent["b"]) == 500  # all acknowledged
    a.close()
    b.close()
    ids = bronze_ids(lake)
    assert len(ids) == 1000 and set(ids) == set(sent["a"]) | set(sent["b"])


def test_a_restart_keeps_the_id_the_wal_was_written_under(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    s = replica(tmp_path, "a")
    with IngestPipeline(s, lake) as p:
        first = p.node_id
        p.ingest([ev("e1")])
    assert (tmp_path / "wal-a" / NODE_FILE).read_text().strip() == first
    with IngestPipeline(s, lake) as q:
        assert q.node_id == first
        assert len(q.ingest([ev("e2")]).accepted) == 1
    assert sorted(bronze_ids(lake)) == ["e1", "e2"]


def test_a_configured_id_is_used_and_must_match_the_wal(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    with IngestPipeline(replica(tmp_path, "a", node_id="shop-eu-1"), lake) as p:
        assert p.node_id == "shop-eu-1" and p.app_id == "lambdarec-wal-shop-eu-1"
    with pytest.raises(NodeIdentityError, match=r"server.node_id: 'other' differs from "
                                                 r"'shop-eu-1' recorded in .*NODE"):
        IngestPipeline(replica(tmp_path, "a", node_id="other"), lake).start()
    with pytest.raises(NodeIdentityError, match=r"server.node_id: must be 1-64 characters"):
        IngestPipeline(replica(tmp_path, "b", node_id="no/slash"), lake)


def test_a_wal_written_before_ids_were_recorded_keeps_node_0(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal-old"
    log = WriteAheadLog.open(wal_dir)  # a segment, and no NODE file: an older release's WAL
    log.close()
    assert any(p.suffix == ".wal" for p in wal_dir.iterdir())
    lake = Lake(tmp_path / "lake")
    with IngestPipeline(replica(tmp_path, "old"), lake) as p:
        assert p.node_id == LEGACY_NODE_ID


def test_a_live_process_holding_the_wal_dir_or_the_node_id_is_refused(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    holder = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from lake.config import load_settings
        from lake.tables import Lake
        from online.ingest import IngestPipeline
        s = load_settings(env={{}}, overrides={{"lake": {{"root": {str(tmp_path / "lake")!r}}},
            "server": {{"wal_dir": {str(tmp_path / "wal-a")!r}, "node_id": "n1"}}}})
        p = IngestPipeline(s, Lake(s.lake.root))
        p.start()
        print("held", flush=True)
        sys.stdin.readline()
        p.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(NodeIdentityError, match=r"server.wal_dir: .*wal-a is in use by "
                                                     r"another live process"):
            IngestPipeline(replica(tmp_path, "a"), lake).start()
        held = (r"server.node_id: 'n1' is held by another live process on this lake "
                rf"\(pid {proc.pid}\)")
        with pytest.raises(NodeIdentityError, match=held):
            IngestPipeline(replica(tmp_path, "b", node_id="n1"), lake).start()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=60)
    # the holder is gone: both are free again
    with IngestPipeline(replica(tmp_path, "b", node_id="n1"), lake) as p:
        assert p.node_id == "n1"
