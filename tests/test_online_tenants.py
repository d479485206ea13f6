"""Event ids are unique per tenant, the name of the access key that sent them: the same id
from another key is another event, from the same key (or a rotated key of the same name) a
duplicate. Real servers on 127.0.0.1 with a real keys file, a real lake and WAL under
tmp_path, graceful and kill -9 restarts, the silver compaction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lambdarec_client import Client
from test_online_idempotency import SERVER_CHILD, overrides, settings

from lake.tables import Lake
from lake.validation import id_problem
from online.committed_ids import scoped_id
from online.console.data import ConsoleData
from online.fleet_channel import decode_events, encode_events
from online.ingest import REC_EVENTS, IngestPipeline
from online.keys import KeyStore
from online.server import create_server
from online.wal import WriteAheadLog
from spark_jobs import compact

ROOT = Path(__file__).resolve().parent.parent
TS = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def orders(user: str, n: int = 100) -> list[dict[str, Any]]:
    """The issue's case: ids order-1000 ... order-1099, as real purchases of `user`."""
    return [{"event_id": f"order-{1000 + i}", "user_id": user, "item_id": f"i{i % 7}",
             "event_type": "purchase", "value": 10.0 + i, "ts": TS} for i in range(n)]


def make_keys(tmp: Path, *names: str) -> dict[str, str]:
    store = KeyStore(tmp / "lake" / "access_keys.json")  # the default: next to the tables
    return {name: store.create(name, ("ingest",))[1] for name in names}


def send(target: str, key: str, evs: list[dict[str, Any]]) -> tuple[int, int]:
    with Client(target, key=key, timeout=30) as c:
        r = c.ingest(evs)
    return r.accepted, r.duplicates


class Server:
    def __init__(self, tmp: Path, **server: Any) -> None:
        self.srv, ports = create_server(settings(tmp, **server), metrics=False)
        self.srv.start()
        self.target = f"127.0.0.1:{ports['grpc']}"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.stop(grace=1)  # flushes to bronze, deletes the WAL


def bronze(tmp: Path) -> Counter[tuple[str, str]]:
    """(tenant, user) -> events in bronze."""
    rows = Lake(tmp / "lake").read("bronze_events", columns=["tenant", "user_id", "event_id"])
    assert len(set(zip(rows["tenant"].to_pylist(), rows["event_id"].to_pylist(),
                       strict=True))) == rows.num_rows, "one row per (tenant, event_id)"
    return Counter(zip(rows["tenant"].to_pylist(), rows["user_id"].to_pylist(), strict=True))


def test_another_keys_same_ids_are_accepted_across_restarts_and_compaction(
        tmp_path: Path) -> None:
    keys = make_keys(tmp_path, "shopA", "shopB", "shopC")
    with Server(tmp_path) as s:
        assert send(s.target, keys["shopA"], orders("uA")) == (100, 0)
        assert send(s.target, keys["shopB"], orders("uB")) == (100, 0)  # was (0, 100)
        assert send(s.target, keys["shopA"], orders("uA")) == (0, 100)  # still duplicates
        assert send(s.target, keys["shopB"], orders("uB")) == (0, 100)
        console = ConsoleData(s.srv)  # its in-process key is no tenant: ""
        try:
            assert console.ingest("uConsole", "i1", "view")["accepted"] == 1
        finally:
            console.close()
    assert not list((tmp_path / "wal").glob("*.wal"))
    assert bronze(tmp_path) == {("shopA", "uA"): 100, ("shopB", "uB"): 100,
                                ("", "uConsole"): 1}

    # after a restart the window comes from bronze: per tenant still
    store = KeyStore(tmp_path / "lake" / "access_keys.json")
    store.revoke("shopA")  # a rotated key keeps its name, so its tenant
    keys["shopA"] = store.create("shopA", ("ingest",))[1]
    with Server(tmp_path) as s:
        assert send(s.target, keys["shopA"], orders("uA")) == (0, 100)
        assert send(s.target, keys["shopB"], orders("uB")) == (0, 100)
        assert send(s.target, keys["shopC"], orders("uC", 50)) == (50, 0)
    assert bronze(tmp_path) == {("shopA", "uA"): 100, ("shopB", "uB"): 100,
                                ("shopC", "uC"): 50, ("", "uConsole"): 1}

    # silver keeps every tenant's events (first arrival wins within a tenant only)
    result = compact.run(settings(tmp_path))
    assert result["silver_rows"] == 251
    silver = Lake(tmp_path / "lake").read("silver_events", columns=["tenant", "user_id"])
    assert Counter(zip(silver["tenant"].to_pylist(), silver["user_id"].to_pylist(),
                       strict=True)) == {("shopA", "uA"): 100, ("shopB", "uB"): 100,
                                         ("shopC", "uC"): 50, ("", "uConsole"): 1}


def test_the_wal_keeps_each_events_tenant_through_a_kill_9(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, "shopA", "shopB", "shopC")
    # nothing reaches bronze before the kill: the replayed WAL alone must know the tenants
    cfg = overrides(tmp_path, flush_interval_s=3600.0, flush_max_events=100_000)
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, json.dumps(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        target = f"127.0.0.1:{json.loads(line)['grpc']}"
        assert send(target, keys["shopA"], orders("uA")) == (100, 0)
        assert send(target, keys["shopB"], orders("uB")) == (100, 0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not Lake(tmp_path / "lake").exists("bronze_events")
    with Server(tmp_path, flush_interval_s=3600.0, flush_max_events=100_000) as s:
        assert send(s.target, keys["shopA"], orders("uA")) == (0, 100)
        assert send(s.target, keys["shopB"], orders("uB")) == (0, 100)
        assert send(s.target, keys["shopC"], orders("uC")) == (100, 0)
    assert bronze(tmp_path) == {("shopA", "uA"): 100, ("shopB", "uB"): 100,
                                ("shopC", "uC"): 100}


def test_wal_records_written_before_tenants_replay_with_the_empty_tenant(
        tmp_path: Path) -> None:
    cfg = settings(tmp_path, flush_interval_s=3600.0)
    us = int(TS.timestamp() * 1_000_000)
    # a record as the previous version wrote it: nine fields, no tenant
    old_rows = [[f"order-{i}", "uOld", "i1", "view", None, us, us, None, None] for i in (1, 2)]
    wal = WriteAheadLog.open(cfg.server.wal_dir)
    wal.sync(wal.write(REC_EVENTS, json.dumps(old_rows).encode()))
    wal.close()
    lake = Lake(tmp_path / "lake")
    with IngestPipeline(cfg, lake) as p:
        assert p.replayed_events == 2
        again = [{"event_id": f"order-{i}", "user_id": "uOld", "item_id": "i1",
                  "event_type": "view", "ts": TS} for i in (1, 2)]
        assert p.ingest(again).duplicates == 2  # the tenant "" sent them
        assert len(p.ingest(again, tenant="shopA").accepted) == 2
    assert bronze(tmp_path) == {("", "uOld"): 2, ("shopA", "uOld"): 2}


def test_peers_events_are_duplicates_for_their_tenant_only(tmp_path: Path) -> None:
    """The fleet stream carries each event's tenant; a replica that applied a peer's events
    treats a resend as a duplicate only when the same tenant sends it."""
    evs = [dict(e, received_at=TS, tenant="shopA") for e in orders("uA", 3)]
    wire = decode_events(encode_events(evs))
    assert [(e["tenant"], e["event_id"]) for e in wire] == [
        ("shopA", f"order-{1000 + i}") for i in range(3)]
    # a replica that predates tenants sends seven fields: those events have tenant ""
    old = json.dumps([[e["event_id"], "uA", "i1", "purchase", 1.0, 0, None] for e in evs])
    assert {e["tenant"] for e in decode_events(old.encode())} == {""}

    with IngestPipeline(settings(tmp_path), Lake(tmp_path / "lake")) as p:
        p.note_peer_events(wire)
        assert p.ingest(orders("uA", 3), tenant="shopA").duplicates == 3
        assert len(p.ingest(orders("uB", 3), tenant="shopB").accepted) == 3
        assert len(p.ingest(orders("u0", 3)).accepted) == 3  # the tenant "" is a tenant too


def test_scoped_ids_never_collide_across_tenants() -> None:
    # any tenant name (a key name is free text); ids never hold a NUL (validation)
    assert id_problem("a\x00b", 256) is not None
    pairs = [("", "a"), ("", "b"), ("a", "b"), ("b", "a"), ("a\x00b", "c"), ("a", "bc"),
             ("ab", "c"), ("", "ab")]
    assert len({scoped_id(t, e) for t, e in pairs}) == len(pairs)
    assert scoped_id("", "order-1") == "order-1"  # events without a tenant: as before
