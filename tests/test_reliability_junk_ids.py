"""A flood of made-up user ids: online memory stays within the caps, nothing acknowledged
is lost, and a restart rebuilds only the latest users.

`python -m online.server` (a subprocess, 127.0.0.1, the known bundle of
tests/online_bundles.py trained up to yesterday, small caps: 300 online users, 2,000
events and seen items) receives, one IngestEvents call at a time:

* the events of a known batch user (`uA0`) and of a new real user first, then
* 20,000 events from 20,000 fresh made-up user ids and 200 made-up "heavy" users with
  40 events each on made-up items (over the per-user caps: 20 events, 20 seen items).

While it floods, the server's `lambdarec_online_users` gauge never passes the cap. Then
it is killed with SIGKILL (no flush) and a server on the same lake and WAL is started in
this process: the WAL replay brings every acknowledged event to bronze exactly once, and
the warm start holds exactly the users who sent the last events, within both caps. The
evicted known user still gets their batch recommendations; the evicted new user comes
back with their next event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import online_bundles as kb
import pytest
from lambdarec_client import Client

from lake.config import load_settings
from online.ports import free_port
from online.recommender import FilterSpec
from online.server import create_server

ROOT = Path(__file__).resolve().parent.parent
MAX_USERS, MAX_EVENTS, RECENT, SEEN = 300, 2_000, 20, 20
JUNK_USERS, HEAVY_USERS, HEAVY_EVENTS = 20_000, 200, 40
BATCH = 500
MAX_RUN_S = 240.0  # hard bound on the flood loop, whatever happens


def server_env(tmp: Path, port: int, admin: int, metrics: int) -> dict[str, str]:
    srv = {"HOST": "127.0.0.1", "PORT": port, "ADMIN_PORT": admin, "METRICS_PORT": metrics,
           "WAL_DIR": tmp / "wal", "FLUSH_INTERVAL_S": 0.5, "MAX_ONLINE_USERS": MAX_USERS,
           "MAX_ONLINE_EVENTS": MAX_EVENTS, "RECENT_EVENTS_PER_USER": RECENT,
           "SEEN_ITEMS_PER_USER": SEEN, "RELOAD_POLL_S": 0}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC__")}
    env.update({f"LAMBDAREC__SERVER__{k}": str(v) for k, v in srv.items()})
    env.update({"LAMBDAREC__LAKE__ROOT": str(tmp / "lake"),
                "LAMBDAREC__MODEL__DIR": str(tmp / "models"), "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    return env


def online_users(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("lambdarec_online_users "):
                return float(line.split()[1])
    raise AssertionError("no lambdarec_online_users gauge")


def flood() -> list[list[dict[str, Any]]]:
    """The batches, in sending order: two real users, then junk ids and heavy junk users."""
    now = datetime.now(UTC)
    events: list[dict[str, Any]] = [
        {"event_id": "real-1", "user_id": "uA0", "item_id": "C5", "event_type": "purchase"},
        {"event_id": "real-2", "user_id": "newbie", "item_id": "B4", "event_type": "purchase"}]
    heavy_every = JUNK_USERS // HEAVY_USERS
    for j in range(JUNK_USERS):
        events.append({"event_id": f"junk-{j}", "user_id": f"junk-{uuid.uuid4().hex}",
                       "item_id": f"A{j % 10}", "event_type": "view"})
        if j % heavy_every == 0:
            h = j // heavy_every
            events += [{"event_id": f"heavy-{h}-{i}", "user_id": f"heavy-{h}",
                        "item_id": f"made-up-{h}-{i}", "event_type": "view"}
                       for i in range(HEAVY_EVENTS)]
    for e in events:
        e["ts"] = now
    return [events[i:i + BATCH] for i in range(0, len(events), BATCH)]


def ingest(client: Client, batch: list[dict[str, Any]], *, deadline: float) -> Any:
    """IngestEvents, re-sent after the server's hint while it answers RESOURCE_EXHAUSTED
    (per-key rate limits: a refused call acknowledged nothing)."""
    while True:
        assert time.monotonic() < deadline, "flood took too long"
        try:
            return client.ingest(batch)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
            time.sleep(int(hint) / 1000 if hint else 0.2)


@pytest.mark.reliability
def test_junk_ids_stay_within_the_caps_and_lose_nothing(tmp_path: Path) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    kb.build(tmp_path / "models", "v1", as_of=yesterday)
    port, admin, metrics = free_port(), free_port(), free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "online.server"], cwd=ROOT,
                            env=server_env(tmp_path, port, admin, metrics), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    batches = flood()
    acked: list[str] = []
    gauge: list[float] = []
    try:
        from online.fleet import wait_serving

        wait_serving(f"127.0.0.1:{port}", 120, proc)
        t0 = time.monotonic()
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            for n, batch in enumerate(batches):
                reply = ingest(client, batch, deadline=t0 + MAX_RUN_S)
                assert (reply.accepted, reply.duplicates, list(reply.rejected)) == \
                    (len(batch), 0, [])
                acked += [e["event_id"] for e in batch]
                if n % 5 == 0:
                    gauge.append(online_users(metrics))
        gauge.append(online_users(metrics))
    finally:
        proc.send_signal(signal.SIGKILL)  # no flush: the WAL must bring everything back
        proc.wait(30)
        log.close()
    assert max(gauge) <= MAX_USERS and gauge[-1] == MAX_USERS, gauge

    # The users who sent the last events, latest last, as the killed server held them.
    last_sent: dict[str, int] = {}
    held_events: Counter[str] = Counter()
    for i, e in enumerate(e for b in batches for e in b):
        last_sent.pop(e["user_id"], None)
        last_sent[e["user_id"]] = i
        held_events[e["user_id"]] += 1

    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "wal_dir": str(tmp_path / "wal"), "max_online_users": MAX_USERS,
                   "max_online_events": MAX_EVENTS, "recent_events_per_user": RECENT,
                   "seen_items_per_user": SEEN}})
    server, ports = create_server(settings)
    server.start()
    try:
        ids = server.lake.read("bronze_events", columns=["event_id"]).column("event_id")
        counts = Counter(ids.to_pylist())
        assert set(counts) == set(acked) and max(counts.values()) == 1  # nothing lost, once
        state = server.engine.state
        users = state.users()
        assert len(users) <= MAX_USERS and state.events_held <= MAX_EVENTS
        assert users == list(last_sent)[-len(users):]  # the latest ones, in order
        assert all(len(state.recent_events(u)) == min(RECENT, held_events[u]) for u in users)
        # the known user left the online state but keeps the batch model's answer
        assert "uA0" not in users and "newbie" not in users
        out = server.engine.recommend("uA0", 3, FilterSpec())
        assert [i for i, _, _ in out.items] == ["A2", "A3", "A4"]
        assert server.engine.recommend("newbie", 2, FilterSpec()).strategy == "fallback"
        with Client(f"127.0.0.1:{ports['grpc']}", timeout=10) as client:
            client.ingest([{"event_id": "back-1", "user_id": "newbie", "item_id": "C6",
                            "event_type": "purchase"}])
            back = client.recommend("newbie", k=2)
        assert [i.item_id for i in back.items] == ["C0", "C1"]
    finally:
        server.stop(grace=1)
