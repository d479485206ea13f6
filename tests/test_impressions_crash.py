"""kill -9 a serving process after acknowledged events and durable impressions: after the
restart every impression written before the last fsync is in `bronze_impressions` exactly
once (some committed before the kill, the rest replayed from the WAL), and so is every
acknowledged event in `bronze_events`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import online_bundles as kb
from lambdarec_client import Client

from lake.config import load_settings
from lake.tables import Lake
from online.ingest import IngestPipeline

ROOT = Path(__file__).resolve().parent.parent

# A real server; on stdin "STATS" prints the pipeline's stats, "FLUSH" commits to the lake.
CHILD = textwrap.dedent("""
    import json, sys
    from lake.config import load_settings
    from online.server import create_server
    s = load_settings(env={}, overrides=json.loads(sys.argv[1]))
    server, ports = create_server(s, metrics=False)
    server.start()
    print("PORT", ports["grpc"], flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "STATS":
            print("STATS", json.dumps(server.ingest.stats(), default=str), flush=True)
        elif cmd == "FLUSH":
            server.ingest.flush()
            print("FLUSHED", flush=True)
""")


def overrides(tmp: Path) -> dict[str, Any]:
    # No flush but the ones the test asks for: what the kill leaves is only in the WAL.
    return {"lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
            "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                       "wal_dir": str(tmp / "wal"), "flush_interval_s": 3600.0,
                       "flush_max_events": 100_000}}


class Child:
    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(overrides(tmp))],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        kind, port = self._line().split()
        assert kind == "PORT"
        self.client = Client(f"127.0.0.1:{port}", timeout=30)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited ({self.proc.wait(10)})")
        return line.strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def stats(self) -> dict[str, Any]:
        kind, _, body = self.ask("STATS").partition(" ")
        assert kind == "STATS"
        return json.loads(body)  # type: ignore[no-any-return]

    def wait_recorded(self, n: int) -> None:
        """Until `n` impressions are durable (appended and fsynced by the writer)."""
        deadline = time.monotonic() + 30
        while self.stats()["impressions_recorded"] < n:
            assert time.monotonic() < deadline, "impressions never became durable"
            time.sleep(0.01)

    def kill(self) -> None:
        self.client.close()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def test_kill_9_keeps_durable_impressions_exactly_once(tmp_path: Path) -> None:
    kb.build(tmp_path / "models", "v1")
    child = Child(tmp_path)
    users = [f"u{c}{i}" for c in "ABC" for i in range(3)]
    committed = [child.client.recommend(u, k=3).recommendation_id for u in users * 3]
    child.wait_recorded(len(committed))
    assert child.ask("FLUSH") == "FLUSHED"  # in bronze_impressions before the kill
    assert child.stats()["impressions_flushed"] == len(committed)
    durable = [child.client.recommend(u, k=3).recommendation_id for u in users * 2]
    durable.append(child.client.similar("A0", k=3, user_id="uA0").recommendation_id)
    child.wait_recorded(len(committed) + len(durable))
    in_flight = [child.client.recommend(u, k=3).recommendation_id for u in users]
    acked = child.client.ingest([{"event_id": f"e{n}", "user_id": "uA0", "item_id": "A3",
                                  "event_type": "click", "ts": datetime.now(UTC),
                                  "recommendation_id": committed[0]} for n in range(5)])
    assert acked.accepted == 5  # fsynced: the last fsync before the kill
    child.kill()

    # the restart replays the WAL (events and impressions, each past its table's version)
    settings = load_settings(env={}, overrides=overrides(tmp_path))
    lake = Lake(tmp_path / "lake")
    p = IngestPipeline(settings, lake)
    p.start()
    assert p.stats()["replayed_impressions"] >= len(durable)
    p.close()
    assert sorted(f.name for f in (tmp_path / "wal").glob("*.wal")) == []

    ids = lake.read("bronze_impressions", columns=["recommendation_id"]).column(
        "recommendation_id").to_pylist()
    assert len(ids) == len(set(ids)), "an impression landed in bronze twice"
    assert set(committed) | set(durable) <= set(ids)
    assert set(ids) <= set(committed) | set(durable) | set(in_flight)
    events = lake.read("bronze_events", columns=["event_id", "recommendation_id"]).to_pylist()
    assert sorted((e["event_id"], e["recommendation_id"]) for e in events) == [
        (f"e{n}", committed[0]) for n in range(5)]
