"""The online layer as a fleet: real replicas (`python -m online.server` processes), a real
HAProxy front door and a real redis-server, on a tmp lake with the known bundle of
`tests/online_bundles.py` (answers known in advance: see there).

Each replica's addresses come from `fleet.json`, as an operator would read them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lambdarec_client import Client

from lake.config import ConfigError, load_settings
from lake.fleet_file import FLEET_FILE, read_fleet
from lake.reload_notice import fleet_targets, notify_reload
from lake.tables import Lake
from lake.training_cut import TrainingCut
from online.fleet import Fleet
from online.pb import recommender_pb2 as pb
from online.ports import free_port
from tests import online_bundles

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("redis-server") and (
        shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin"))),
        reason="redis-server and haproxy are installed by infra/scripts/ensure_system.sh"),
]
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fleet-token"
BOUND_S = 1.0  # the bound for cross-replica visibility


def fleet_env(tmp: Path) -> dict[str, str]:
    return {
        "LAMBDAREC__LAKE__ROOT": str(tmp / "lake"),
        "LAMBDAREC__MODEL__DIR": str(tmp / "models"),
        "LAMBDAREC__SERVER__WAL_DIR": str(tmp / "wal"),
        "LAMBDAREC__SERVER__PORT": str(free_port("127.0.0.1")),
        "LAMBDAREC__SERVER__ADMIN_PORT": str(free_port("127.0.0.1")),
        "LAMBDAREC__SERVER__METRICS_PORT": "0",
        "LAMBDAREC__SERVER__ADMIN_TOKEN": TOKEN,
        "LAMBDAREC__SERVER__WORKERS": "4",
        "LAMBDAREC__SERVER__FLUSH_INTERVAL_S": "0.5",
        "LAMBDAREC__FLEET__RUN_DIR": str(tmp / "run"),
        "LAMBDAREC__DATA__SOURCE": "none",
    }


def start_fleet(tmp: Path, **env_over: str) -> Fleet:
    env = {**fleet_env(tmp), **env_over}
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC")}
    f = Fleet(load_settings(env=env), 2, env={**base, **env, "OMP_NUM_THREADS": "1"})
    f.start(timeout_s=180)
    return f


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    online_bundles.build(tmp_path / "models", "v1")
    f = start_fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


def ids(resp: Any) -> list[str]:
    return [i.item_id for i in resp.items]


def within(bound_s: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` holds; fails the test past `bound_s`."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > bound_s:
            pytest.fail(f"not visible within {bound_s} s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def clients(state: dict[str, Any]) -> list[Client]:
    return [Client(r["grpc"], r["admin"], token=TOKEN) for r in state["replicas"]]


def test_one_truth_across_replicas_through_one_address(fleet: Fleet) -> None:
    state = read_fleet(fleet.run_dir)
    assert state is not None and len(state["replicas"]) == 2
    assert len({r["node_id"] for r in state["replicas"]}) == 2  # each its own WAL and id
    assert all(r["pid"] and r["admin"] for r in state["replicas"])
    front = Client(state["front_door"]["grpc"], timeout=10.0)
    reps = clients(state)
    try:
        for c in reps:
            assert c.recommend("n1", k=4).strategy == pb.STRATEGY_FALLBACK
            assert ids(c.recommend("uB0", k=3)) == ["B2", "B3", "B4"]  # B0, B1 seen
        # an event acknowledged through the front door is reflected on every replica
        out = front.ingest([{"event_id": "n1-1", "user_id": "n1", "item_id": "C4",
                             "event_type": "purchase"}])
        assert out.accepted == 1
        for c in reps:
            within(BOUND_S, lambda c=c: ids(c.recommend("n1", k=4)) == ["C0", "C1", "C2", "C3"])
        # a client resending the acknowledged event to any replica gets "duplicate" there
        for c in reps:
            again = c.ingest([{"event_id": "n1-1", "user_id": "n1", "item_id": "C4",
                               "event_type": "purchase"}])
            assert (again.accepted, again.duplicates) == (0, 1)
        # availability changed on replica 1 is applied by replica 0
        assert reps[1].upsert_items([{"item_id": "B2", "available": False}]).upserted == 1
        within(BOUND_S, lambda: ids(reps[0].recommend("uB0", k=3)) == ["B3", "B4", "B5"])
        # ForgetUser on replica 0: replica 1 stops serving the user's batch vector and events
        reps[0].forget_user("uB0")
        reps[0].forget_user("n1")
        within(BOUND_S, lambda: reps[1].recommend("uB0", k=3).strategy == pb.STRATEGY_FALLBACK)
        within(BOUND_S, lambda: reps[1].recommend("n1", k=3).strategy == pb.STRATEGY_FALLBACK)
        # a published model reaches every replica: the reload aimed at the front door's
        # admin address (make pipeline's default target) goes to each of them
        assert fleet_targets([state["front_door"]["admin"], "10.0.0.9:1"], fleet.run_dir) == \
            [r["admin"] for r in state["replicas"]] + ["10.0.0.9:1"]
        online_bundles.build(fleet.settings.model.dir, "v2")
        out = notify_reload([state["front_door"]["admin"]], TOKEN, None,
                            fleet_dir=fleet.run_dir)
        assert sorted(out["targets"]) == sorted(r["admin"] for r in state["replicas"])
        assert [c.model_info().model_version for c in reps] == ["v2", "v2"]
        kept = front.ingest([{"event_id": f"n2-{i}", "user_id": "n2", "item_id": f"A{i}",
                              "event_type": "view"} for i in range(3)])
        assert kept.accepted == 3
    finally:
        for c in [front, *reps]:
            c.close()
    fleet.stop()  # graceful: every replica flushes its WAL to bronze
    assert not (fleet.run_dir / FLEET_FILE).exists()
    bronze = Lake(fleet.settings.lake.root).read("bronze_events",
                                                 columns=["event_id", "user_id"])
    assert sorted(bronze.column("event_id").to_pylist()) == ["n2-0", "n2-1", "n2-2"]
    for r in state["replicas"]:
        assert not list(Path(r["wal_dir"]).glob("*.wal"))  # drained


def test_ingest_goes_on_without_redis_and_peers_catch_up(fleet: Fleet) -> None:
    state = read_fleet(fleet.run_dir)
    assert state is not None and fleet.redis is not None
    reps = clients(state)
    try:
        fleet.redis.stop()
        out = reps[0].ingest([{"event_id": "r1-1", "user_id": "r1", "item_id": "C4",
                               "event_type": "purchase"}])
        assert out.accepted == 1  # acknowledged: WAL-durable, Redis not needed
        assert ids(reps[0].recommend("r1", k=4)) == ["C0", "C1", "C2", "C3"]
        # through the front door a user's calls stay on one replica (x-lambdarec-user), so
        # read-your-writes holds without the channel; round robin would miss half the time
        with Client(state["front_door"]["grpc"], timeout=10.0) as front:
            for u in range(6):
                front.ingest([{"event_id": f"aff{u}", "user_id": f"aff{u}", "item_id": "B5",
                               "event_type": "purchase"}])
                for _ in range(4):
                    assert front.recommend(f"aff{u}", k=2).strategy == \
                        pb.STRATEGY_PERSONALISED
        time.sleep(1.0)
        assert reps[1].recommend("r1", k=4).strategy == pb.STRATEGY_FALLBACK  # degraded
        fleet.redis.start()  # same port: the buffered entry is sent, the reader resumes
        within(10.0, lambda: ids(reps[1].recommend("r1", k=4)) == ["C0", "C1", "C2", "C3"])
    finally:
        for c in reps:
            c.close()


def test_a_restarted_replica_catches_up_from_its_wal_and_the_stream(tmp_path: Path) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)  # the model learned nothing of today
    online_bundles.build(tmp_path / "models", "v1",
                         manifest=TrainingCut(yesterday, yesterday).to_manifest())
    f = start_fleet(tmp_path, LAMBDAREC__SERVER__FLUSH_INTERVAL_S="3600")  # nothing flushes
    state = read_fleet(f.run_dir)
    assert state is not None
    reps = clients(state)
    try:
        reps[0].ingest([{"event_id": "p1-1", "user_id": "p1", "item_id": "C4",
                         "event_type": "purchase"}])  # only in replica 0's WAL and the stream
        reps[1].ingest([{"event_id": "p2-1", "user_id": "p2", "item_id": "A4",
                         "event_type": "purchase"}])  # only in replica 1's WAL and the stream
        within(BOUND_S, lambda: ids(reps[1].recommend("p1", k=4)) == ["C0", "C1", "C2", "C3"])
        victim = f.members[1]
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        within(30.0, lambda: victim.restarts == 1)
        f.wait_replica(1, timeout_s=120)
        # p1 from the stream (replica 0 has not flushed it), p2 from its own WAL replay
        assert ids(reps[1].recommend("p1", k=4)) == ["C0", "C1", "C2", "C3"]
        assert ids(reps[1].recommend("p2", k=4)) == ["A0", "A1", "A2", "A3"]
        assert ids(reps[0].recommend("p2", k=4)) == ["A0", "A1", "A2", "A3"]
    finally:
        for c in reps:
            c.close()
        f.stop()
    got = Lake(tmp_path / "lake").read("bronze_events", columns=["event_id"])
    assert sorted(got.column("event_id").to_pylist()) == ["p1-1", "p2-1"]


def kill_during_ingest(fleet: Fleet, kills: int) -> dict[str, int]:
    """Ingest through the front door from 4 threads while replicas are SIGKILLed in turn
    (the fleet restarts each on its WAL); then a graceful stop. Returns counts."""
    state = read_fleet(fleet.run_dir)
    assert state is not None
    acked: list[str] = []
    failed = [0]
    stop = threading.Event()

    def load(t: int) -> None:
        with Client(state["front_door"]["grpc"], timeout=5.0) as c:
            b = 0
            while not stop.is_set():
                batch = [{"event_id": f"k{t}-{b}-{i}", "user_id": f"k{t}-{b % 13}",
                          "item_id": f"A{i}", "event_type": "view"} for i in range(5)]
                b += 1
                try:
                    out = c.ingest(batch)
                except Exception:  # noqa: BLE001 - a failed call is counted, never resent
                    failed[0] += 1
                    continue
                acked.extend(e["event_id"] for e in batch[:out.accepted])

    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        for k in range(kills):
            time.sleep(1.0)
            r = fleet.members[k % len(fleet.members)]
            before, n_before = r.restarts, len(acked)
            assert r.proc is not None
            os.kill(r.proc.pid, signal.SIGKILL)
            within(30.0, lambda r=r, before=before: r.restarts > before)
            fleet.wait_replica(r.index, timeout_s=120)
            assert len(acked) > n_before  # the front door kept answering
    finally:
        stop.set()
        for t in threads:
            t.join()
    fleet.stop()
    got = Lake(fleet.settings.lake.root).read("bronze_events", columns=["event_id"]) \
        .column("event_id").to_pylist()
    lost = set(acked) - set(got)
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:3]}"
    assert len(got) == len(set(got)), "duplicated events in bronze_events"
    print(f"kills={kills} acked={len(acked)} failed_calls={failed[0]} bronze={len(got)}")
    return {"acked": len(acked), "failed": failed[0], "bronze": len(got)}


def test_kill_9_during_ingest_loses_and_duplicates_nothing(fleet: Fleet) -> None:
    kill_during_ingest(fleet, kills=2)


@pytest.mark.integration
@pytest.mark.reliability
def test_kill_9_ten_times_during_ingest(fleet: Fleet) -> None:
    kill_during_ingest(fleet, kills=10)


def test_replicas_stopped_in_turn_under_load_fail_no_call(fleet: Fleet) -> None:
    """A rolling restart: each replica in turn gets SIGTERM while 4 threads call Recommend
    and IngestEvents through the front door. The stopping replica turns NOT_SERVING on its
    /healthz, HAProxy moves its users to the other before its ports close (drain), the
    fleet restarts it: not one call fails, and every acknowledged event is in bronze."""
    state = read_fleet(fleet.run_dir)
    assert state is not None
    calls, failures, acked = [0], [], []
    stop = threading.Event()

    def load(t: int) -> None:
        with Client(state["front_door"]["grpc"], timeout=5.0) as c:
            n = 0
            while not stop.is_set():
                n += 1
                user = f"g{t}-{n % 17}"  # many users: both replicas get calls
                try:
                    c.recommend(user, k=3)
                    out = c.ingest([{"event_id": f"g{t}-{n}", "user_id": user,
                                     "item_id": f"A{n % 6}", "event_type": "view"}])
                    acked.extend([f"g{t}-{n}"] * out.accepted)
                except Exception as exc:  # noqa: BLE001 - counted, the test fails on any
                    failures.append(repr(exc)[:200])
                calls[0] += 2

    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        for r in fleet.members:
            time.sleep(1.0)
            before, calls_before = r.restarts, calls[0]
            assert r.proc is not None
            r.proc.send_signal(signal.SIGTERM)
            within(30.0, lambda r=r, before=before: r.restarts > before)
            fleet.wait_replica(r.index, timeout_s=120)
            assert calls[0] > calls_before  # the front door kept answering
        time.sleep(1.0)  # calls again reach the restarted replica
    finally:
        stop.set()
        for t in threads:
            t.join()
    fleet.stop()
    print(f"rolling restart: calls={calls[0]} failed={len(failures)} acked={len(acked)}")
    assert not failures, f"{len(failures)} failed calls, e.g. {failures[:3]}"
    got = Lake(fleet.settings.lake.root).read("bronze_events", columns=["event_id"]) \
        .column("event_id").to_pylist()
    assert sorted(got) == sorted(acked)


def test_make_run_replicas_starts_and_ctrl_c_stops_the_whole_fleet(tmp_path: Path) -> None:
    online_bundles.build(tmp_path / "models", "v1")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC")},
           **fleet_env(tmp_path)}
    bad = subprocess.run([sys.executable, "-m", "online.run", "--replicas", "0"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=False)
    assert (bad.returncode, bad.stderr.strip()) == (2, "error: REPLICAS: must be at least 1, "
                                                       "got 0")
    proc = subprocess.Popen([sys.executable, "-m", "online.run", "--replicas", "2"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        started = next((json.loads(line) for line in proc.stdout
                        if line.startswith("{") and '"fleet"' in line), None)
        assert started is not None, "the fleet never came up"
        state = read_fleet(tmp_path / "run")
        assert state == started["fleet"]
        pids = [r["pid"] for r in state["replicas"]] + [state["front_door"]["pid"],
                                                        state["redis"]["pid"]]
        with Client(state["front_door"]["grpc"], timeout=10.0) as c:
            assert c.ingest([{"event_id": "cc-1", "user_id": "cc", "item_id": "A1",
                              "event_type": "view"}]).accepted == 1
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    for pid in pids:  # every part of the fleet is gone, not left running
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert Lake(tmp_path / "lake").read("bronze_events", columns=["event_id"]) \
        .column("event_id").to_pylist() == ["cc-1"]  # flushed on the way out
    assert not (tmp_path / "run" / FLEET_FILE).exists()


def test_a_fleet_with_tls_on_the_replicas_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    env = {**fleet_env(tmp_path), "LAMBDAREC__SERVER__TLS_CERT": str(tmp_path / "cert.pem"),
           "LAMBDAREC__SERVER__TLS_KEY": str(tmp_path / "key.pem")}
    f = Fleet(load_settings(env=env), 2, env=env)
    with pytest.raises(ConfigError, match=r"^server\.tls_cert: .*plaintext"):
        f.start(timeout_s=5)
    assert f.members == [] and not (tmp_path / "run").exists()
