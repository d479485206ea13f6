"""IngestEvents stays idempotent by event_id across restarts: a real server on 127.0.0.1, a
real lake and WAL under tmp_path, a graceful stop and a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lambdarec_client import Client

from lake.config import Settings, load_settings
from lake.tables import Lake
from online.committed_ids import CommittedIds, day_of
from online.server import create_server

ROOT = Path(__file__).resolve().parent.parent

SERVER_CHILD = textwrap.dedent("""
    import json, sys, threading
    from lake.config import load_settings
    from online.server import create_server
    s = load_settings(env={}, overrides=json.loads(sys.argv[1]))
    server, ports = create_server(s, metrics=False)
    server.start()
    print(json.dumps(ports), flush=True)
    threading.Event().wait()
""")


def overrides(tmp: Path, **server: Any) -> dict[str, Any]:
    # no events/s limit: these tests resend as fast as they can (see test_online_rate_limits)
    srv = {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
           "wal_dir": str(tmp / "wal"), "flush_interval_s": 0.05, "flush_max_events": 1000,
           "max_batch": 1000, "rate_limit_events_per_s": 0, **server}
    return {"lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
            "server": srv}


def settings(tmp: Path, **server: Any) -> Settings:
    return load_settings(env={}, overrides=overrides(tmp, **server))


def events(tag: str, n: int) -> list[dict[str, Any]]:
    ts = datetime.now(UTC)
    return [{"event_id": f"{tag}-{i:06d}", "user_id": f"u{i % 50}", "item_id": f"i{i % 70}",
             "event_type": "view", "ts": ts,
             "properties": {"pad": "x" * 100}} for i in range(n)]


def send(target: str, evs: list[dict[str, Any]]) -> tuple[int, int]:
    accepted = duplicates = 0
    with Client(target, timeout=30) as c:
        for i in range(0, len(evs), 1000):
            r = c.ingest(evs[i:i + 1000])
            accepted += r.accepted
            duplicates += r.duplicates
    return accepted, duplicates


def bronze_ids(tmp: Path) -> list[str]:
    lake = Lake(tmp / "lake")
    return lake.read("bronze_events", columns=["event_id"]).column("event_id").to_pylist()


def resend_after_restart(tmp: Path, evs: list[dict[str, Any]], **server: Any) -> tuple[int, int]:
    srv, ports = create_server(settings(tmp, **server), metrics=False)
    srv.start()
    try:
        return send(f"127.0.0.1:{ports['grpc']}", evs)
    finally:
        srv.stop(grace=1)


def test_resend_after_graceful_restart_is_all_duplicates(tmp_path: Path) -> None:
    evs = events("g", 300)
    srv, ports = create_server(settings(tmp_path), metrics=False)
    srv.start()
    try:
        assert send(f"127.0.0.1:{ports['grpc']}", evs) == (300, 0)
    finally:
        srv.stop(grace=1)  # flushes to bronze and deletes the WAL
    assert not list((tmp_path / "wal").glob("*.wal"))
    assert resend_after_restart(tmp_path, evs + events("g2", 5)) == (5, 300)
    ids = bronze_ids(tmp_path)
    assert len(ids) == 305 and len(set(ids)) == 305


def test_resend_after_crash_of_ids_older_than_the_retained_wal(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CHILD,
                             json.dumps(overrides(tmp_path))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        target = f"127.0.0.1:{json.loads(line)['grpc']}"
        evs = events("c", 12_000)  # ~2.5 MB of WAL: flushed segments are released
        assert send(target, evs) == (12_000, 0)
        for _ in range(200):  # wait until bronze holds them all and the WAL was trimmed
            if len(bronze_ids(tmp_path)) == 12_000:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    first_kept = min(int(p.stem) for p in (tmp_path / "wal").glob("*.wal"))
    assert first_kept > 1, "precondition: the WAL no longer holds the oldest records"
    assert resend_after_restart(tmp_path, evs) == (0, 12_000)
    ids = bronze_ids(tmp_path)
    assert len(ids) == 12_000 and len(set(ids)) == 12_000


def test_window_is_configurable_and_documented(tmp_path: Path) -> None:
    evs = events("w", 20)
    srv, ports = create_server(settings(tmp_path), metrics=False)
    srv.start()
    try:
        send(f"127.0.0.1:{ports['grpc']}", evs)
    finally:
        srv.stop(grace=1)
    # window 0: only what the WAL holds counts (the WAL is gone after a graceful stop)
    assert resend_after_restart(tmp_path, evs, dedupe_window_days=0) == (20, 0)
    readme = (ROOT / "README.md").read_text()
    assert "`server.dedupe_window_days`" in readme


@pytest.mark.reliability
def test_resend_after_restarts_soak(tmp_path: Path) -> None:
    evs = events("s", 30_000)
    srv, ports = create_server(settings(tmp_path), metrics=False)
    srv.start()
    try:
        assert send(f"127.0.0.1:{ports['grpc']}", evs) == (30_000, 0)
    finally:
        srv.stop(grace=1)
    for _ in range(3):
        assert resend_after_restart(tmp_path, evs) == (0, 30_000)
    assert len(set(bronze_ids(tmp_path))) == len(bronze_ids(tmp_path)) == 30_000


def test_committed_ids_forget_what_left_the_window() -> None:
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    today = day_of(now)
    ids = CommittedIds(window_days=2)
    ids.add(["old", "edge"], np.array([today - 3, today - 2]), now=now)
    assert ids.contains(["old", "edge", "never"]) == [True, True, False]
    assert ids.expire(now) == 1
    ids.add(["new"], now=now)
    assert ids.contains(["old", "edge", "new"]) == [False, True, True]
    assert ids.nbytes() == 2 * 18
