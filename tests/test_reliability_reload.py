"""Hot reload under load: a client thread calls Recommend at a fixed rate while the test
swaps between two valid bundles and tries a corrupt one after every swap.

v1 and v2 are the known bundle of tests/online_bundles.py; v2 has the same ids with the
item rows permuted, so the right answers are the same on both and a torn swap (ids of one
bundle, index of the other) would show as a wrong answer. v3 is a copy with one byte of
item_factors.npy flipped: its reload must fail with FAILED_PRECONDITION and v3 must never
answer. The client alternates between a batch user (uA0: A2, A3, A4 with A0, A1 seen) and a
real-time user re-folded on every swap (one purchase of B7: B0, B1).

`test_reload_under_load` (5 swaps) runs in `make test`; `test_reload_under_load_soak`
(50 swaps) under `-m reliability`.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import online_bundles as kb
import pytest
from lambdarec_client import Client

from lake.config import load_settings
from online.server import create_server

TOKEN = "reload-token"
RATE_HZ = 200.0
MAX_RUN_S = 120.0  # hard bound on the client loop, whatever happens to the test
CALLS_PER_VERSION = 10  # each swap serves at least this many requests before the next
EXPECTED = {("uA0", 3): ["A2", "A3", "A4"], ("rt-user", 2): ["B0", "B1"]}


class Load:
    """One client thread calling Recommend every 1/RATE_HZ s until stopped."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.calls = 0
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}
        self.latencies: list[float] = []
        self.thread = threading.Thread(target=self._run, name="recommend-load", daemon=True)

    def _run(self) -> None:
        queries = list(EXPECTED)
        with Client(self.target, timeout=10) as client:
            t0 = time.monotonic()
            i = 0
            while not self.stop.is_set() and time.monotonic() - t0 < MAX_RUN_S:
                user, k = queries[i % len(queries)]
                t = time.monotonic()
                try:
                    resp = client.recommend(user, k=k)
                    got = [it.item_id for it in resp.items]
                    if got != EXPECTED[(user, k)]:
                        self.failures.append(f"{resp.model_version}: {user} got {got}")
                    version = resp.model_version
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                    version = None
                self.latencies.append(time.monotonic() - t)
                with self.cond:
                    self.calls += 1
                    if version is not None:
                        self.versions[version] = self.versions.get(version, 0) + 1
                    self.cond.notify_all()
                i += 1
                # fixed rate: wait for the next slot (the stop event ends the wait early)
                self.stop.wait(max(0.0, t0 + i / RATE_HZ - time.monotonic()))

    def wait_calls(self, n: int, timeout: float = 30.0) -> None:
        """Block until `n` more calls have completed."""
        with self.cond:
            target = self.calls + n
            assert self.cond.wait_for(lambda: self.calls >= target, timeout), (
                f"load stalled at {self.calls} calls")


def run_reloads(tmp: Path, swaps: int) -> dict[str, object]:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")},
        "model": {"dir": str(tmp / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": TOKEN, "wal_dir": str(tmp / "wal"), "flush_interval_s": 0.2,
                   "workers": 4},
    })
    models = Path(settings.model.dir)
    kb.build(models, "v1")
    kb.build(models, "v2", shuffle_seed=1, make_current=False)
    kb.corrupt(kb.build(models, "v3", shuffle_seed=2, make_current=False))
    server, ports = create_server(settings, metrics=False)
    server.start()
    load = Load(f"127.0.0.1:{ports['grpc']}")
    admin = Client(f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}", token=TOKEN,
                   timeout=30)
    refused: list[grpc.StatusCode] = []
    swapped: list[tuple[str, str, bool]] = []
    t0 = time.monotonic()
    try:
        admin.ingest([{"event_id": "rt-1", "user_id": "rt-user", "item_id": "B7",
                       "event_type": "purchase", "ts": datetime.now(UTC)}])
        load.thread.start()
        load.wait_calls(CALLS_PER_VERSION)
        serving = "v1"
        for i in range(swaps):
            target = "v2" if i % 2 == 0 else "v1"
            out = admin.reload(target)
            swapped.append((out.model_version, out.previous_version, out.changed))
            assert (out.model_version, out.previous_version, out.changed) == (
                target, serving, True)
            assert out.refolded_users >= 1  # rt-user
            serving = target
            load.wait_calls(CALLS_PER_VERSION)
            try:
                admin.reload("v3")
                refused.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                refused.append(exc.code())
                assert "checksum" in (exc.details() or ""), exc.details()
            load.wait_calls(CALLS_PER_VERSION)
        assert admin.model_info().model_version == serving
    finally:
        load.stop.set()
        load.thread.join(timeout=30)
        admin.close()
        server.stop(grace=1)
    assert not load.thread.is_alive()
    lat = sorted(load.latencies)
    return {"swaps": swaps, "corrupt_attempts": len(refused), "refused": refused,
            "swapped": swapped, "calls": load.calls, "failures": load.failures,
            "versions": load.versions, "seconds": time.monotonic() - t0,
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1000 * lat[-1]}


def check(out: dict) -> None:
    print(f"\nreload under load: {out['swaps']} swaps, {out['corrupt_attempts']} corrupt "
          f"attempts refused, {out['calls']} Recommend calls in {out['seconds']:.1f} s "
          f"(target {RATE_HZ:.0f}/s), by version {out['versions']}, "
          f"p99 {out['p99_ms']:.1f} ms, max {out['max_ms']:.1f} ms")
    assert out["failures"] == [], out["failures"][:5]
    assert out["refused"] == [grpc.StatusCode.FAILED_PRECONDITION] * out["swaps"]
    versions = out["versions"]
    assert set(versions) == {"v1", "v2"}, versions  # both served, v3 never
    assert sum(versions.values()) == out["calls"]
    assert out["calls"] >= (2 * out["swaps"] + 1) * CALLS_PER_VERSION


def test_reload_under_load(tmp_path: Path) -> None:
    check(run_reloads(tmp_path, swaps=5))


@pytest.mark.reliability
def test_reload_under_load_soak(tmp_path: Path) -> None:
    check(run_reloads(tmp_path, swaps=50))
