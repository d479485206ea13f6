"""An experiment across a fleet: two real replicas (`python -m online.server` processes, as
`tests/test_fleet.py` starts them) on one lake. Created on one replica, served by both: the
same 1,000 users get the same arms on each (the issue's formula, written out here), the
split holds over 10k users through the API, and a stop on one replica ends it on both."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from lambdarec_client import Client

from lake.config import load_settings
from lake.fleet_file import read_fleet
from online.fleet import Fleet
from online.ports import free_port
from tests import online_bundles

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("redis-server") and (
        shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin"))),
        reason="redis-server and haproxy are installed by infra/scripts/ensure_system.sh"),
]
TOKEN = "fleet-experiments-token"
SALT = "fleet-salt"
ARMS = [("control", 0.5), ("challenger", 0.3), ("holdout", 0.2)]
TRAFFIC = 0.8


def arm_of(user: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"{SALT}\x1f{user}".encode()).digest()[:8],
                       "big") / 2**64
    if h >= TRAFFIC:
        return ""
    u, total = h / TRAFFIC, 0.0
    for name, share in ARMS:
        total += share
        if u < total:
            return name
    return ARMS[-1][0]


def within(bound_s: float, check: Callable[[], bool]) -> float:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > bound_s:
            pytest.fail(f"not true within {bound_s} s")
        time.sleep(0.05)
    return time.perf_counter() - t0


def arms_of(client: Client, users: list[str]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(users), 1000):
        batch = client.recommend_batch([{"user_id": u, "k": 1} for u in users[i:i + 1000]],
                                       timeout=60)
        out += [r.arm for r in batch.responses]
    return out


def test_one_experiment_the_same_on_both_replicas(tmp_path: Path) -> None:
    online_bundles.build(tmp_path / "models", "v1")
    online_bundles.build(tmp_path / "models", "v2", make_current=False, shuffle_seed=2)
    env = {
        "LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
        "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
        "LAMBDAREC__SERVER__WAL_DIR": str(tmp_path / "wal"),
        "LAMBDAREC__SERVER__PORT": str(free_port("127.0.0.1")),
        "LAMBDAREC__SERVER__ADMIN_PORT": str(free_port("127.0.0.1")),
        "LAMBDAREC__SERVER__METRICS_PORT": "0",
        "LAMBDAREC__SERVER__ADMIN_TOKEN": TOKEN,
        "LAMBDAREC__SERVER__WORKERS": "4",
        "LAMBDAREC__FLEET__RUN_DIR": str(tmp_path / "run"),
        "LAMBDAREC__DATA__SOURCE": "none",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC")}
    fleet = Fleet(load_settings(env=env), 2, env={**base, **env, "OMP_NUM_THREADS": "1"})
    fleet.start(timeout_s=180)
    state = read_fleet(fleet.run_dir)
    assert state is not None
    a, b = (Client(r["grpc"], r["admin"], token=TOKEN, timeout=30) for r in state["replicas"])
    try:
        exp = a.create_experiment("fleet", [
            {"name": "control", "share": 0.5},
            {"name": "challenger", "share": 0.3, "model_version": "v2"},
            {"name": "holdout", "share": 0.2, "popularity": True}],
            traffic=TRAFFIC, salt=SALT)
        # the other replica learns it from the file (one stat a second, then v2's load)
        within(10, lambda: b.recommend("uB0", k=1).experiment_id == exp.experiment_id)
        assert b.get_experiment(exp.experiment_id).salt == SALT

        users = [f"shopper-{i}" for i in range(1000)] + [f"u{c}{i}" for c in "ABC"
                                                         for i in range(3)]
        on_a, on_b = arms_of(a, users), arms_of(b, users)
        assert on_a == on_b == [arm_of(u) for u in users]
        for u in ("uA0", "uB0", "uC0", "uA1", "uB1"):  # the arm's model on either replica
            want = {"control": "v1", "challenger": "v2", "holdout": "v1", "": "v1"}[arm_of(u)]
            assert a.recommend(u, k=1).model_version == b.recommend(u, k=1).model_version \
                == want

        many = [f"visitor-{i}" for i in range(10_000)]
        counts = Counter(arms_of(b, many))
        taking_part = 10_000 - counts[""]
        assert abs(taking_part / 10_000 - TRAFFIC) <= 0.02
        for name, share in ARMS:
            assert abs(counts[name] / taking_part - share) <= 0.02, counts

        assert b.stop_experiment(exp.experiment_id).state == "stopped"
        within(5, lambda: a.recommend("uB0", k=1).experiment_id == "")
    finally:
        a.close()
        b.close()
        fleet.stop()
