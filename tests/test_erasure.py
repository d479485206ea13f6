"""After ForgetUser and the compliance step (`python -m lake.erasure`), no table version, no
bundle and no staged model on disk holds a trace of the user: a real server on 127.0.0.1,
a real lake and bundle, the purge as its own process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import online_bundles as kb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lambdarec_client import Client

from lake.bundle import read_bundle
from lake.config import load_settings
from lake.erasure import USER_TABLES
from lake.tables import Lake, LakeError
from online.model_manager import ModelManager
from online.pb import recommender_pb2 as pb
from online.server import create_server

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken"
VICTIM, KEEPER = "uB1", "uB0"  # both in the known bundle, with factors and history
NOW = datetime.now(UTC)


def env_for(tmp: Path) -> dict[str, str]:
    return {"LAMBDAREC__LAKE__ROOT": str(tmp / "lake"),
            "LAMBDAREC__MODEL__DIR": str(tmp / "models"),
            "LAMBDAREC__SERVER__WAL_DIR": str(tmp / "wal")}


def start(tmp: Path) -> tuple[Any, Client]:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": TOKEN, "wal_dir": str(tmp / "wal")}})
    server, ports = create_server(settings, metrics=False)
    server.start()
    return server, Client(f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}",
                          token=TOKEN, timeout=30)


def seed_derived_tables(lake: Lake) -> None:
    """Silver, gold and factor rows of both users, as a batch run would have written."""
    today = NOW.date()
    for user in (VICTIM, KEEPER):
        lake.append("silver_events", pa.table({
            "event_id": [f"s-{user}"], "user_id": [user], "item_id": ["B5"],
            "event_type": ["view"], "value": pa.array([None], pa.float64()), "ts": [NOW],
            "received_at": [NOW], "session_id": pa.array([None], pa.string()),
            "properties": pa.array([None], pa.string()), "event_date": [today]}))
        lake.append("gold_interactions", pa.table({
            "user_id": [user], "item_id": ["B5"], "confidence": [1.0], "n_events": [1],
            "last_ts": [NOW], "as_of": [today]}))
        lake.append("user_factors", pa.table({
            "user_id": [user], "factors": [[0.5] * 4], "model_version": ["v1"]}))
        lake.append("gold_attributed_events", pa.Table.from_pylist([{
            "event_id": f"c-{user}", "tenant": "", "user_id": user, "item_id": "B5",
            "event_type": "click", "ts": NOW, "recommendation_id": f"r-{user}",
            "rule": "window", "position": 0, "impression_ts": NOW, "event_date": today}]))


def stage_a_model(models: Path) -> Path:
    run = models / "staging" / "v0-old-run"
    run.mkdir(parents=True)
    np.savez(run / "arrays.npz", user_ids=np.array([VICTIM, KEEPER]))
    hours_ago = time.time() - 2 * 3600
    os.utime(run / "arrays.npz", (hours_ago, hours_ago))
    return run


def files_naming(root: Path, user: str, *, skip: str = "user_erasures") -> list[str]:
    """Files under `root` holding the id: Parquet by its decoded rows (its page statistics
    may store a truncated neighbour such as "uB0" -> "uB1"), anything else by its bytes
    (UTF-8, or UTF-32 as numpy stores ids)."""
    needles = (user.encode(), user.encode("utf-32-le"))
    hits = []
    for f in sorted(root.rglob("*")):
        if not f.is_file() or skip in f.parts:
            continue
        if f.suffix == ".parquet":
            text = json.dumps(pq.read_table(f).to_pylist(), default=str)
            found = re.search(rf"(?<![\w-]){re.escape(user)}(?![\w-])", text) is not None
        else:
            found = any(n in f.read_bytes() for n in needles)
        if found:
            hits.append(str(f.relative_to(root)))
    return hits


def users_in_every_version(lake: Lake, name: str) -> tuple[set[str], int]:
    """Users in any readable version of the table, and how many versions were readable."""
    users: set[str] = set()
    readable = 0
    for v in range(lake.version(name) + 1):
        try:
            table = lake.read(name, version=v, columns=["user_id"])
        except (LakeError, OSError, Exception):  # noqa: BLE001 - a purged version
            continue
        readable += 1
        users |= set(table.column("user_id").to_pylist())
    return users, readable


def test_forget_user_then_purge_leaves_no_trace(tmp_path: Path) -> None:
    models = tmp_path / "models"
    kb.build(models, "v1")
    lake = Lake(tmp_path / "lake")
    seed_derived_tables(lake)
    staged = stage_a_model(models)
    server, client = start(tmp_path)
    try:
        client.ingest([{"event_id": f"e-{u}-{i}", "user_id": u, "item_id": f"B{i}",
                        "event_type": "view", "ts": NOW}
                       for u in (VICTIM, KEEPER) for i in range(3)])
        for u in (VICTIM, KEEPER):  # what they were shown: bronze_impressions
            client.recommend(u, k=2)
        server.ingest.impressions.write_now()
        server.ingest.flush()
        client.forget_user(VICTIM)
    finally:
        client.close()
        server.stop(grace=1)
    # ForgetUser alone: gone from the current versions, but time travel still shows them
    assert VICTIM not in set(lake.read("bronze_events").column("user_id").to_pylist())
    assert VICTIM in users_in_every_version(lake, "bronze_events")[0]

    done = subprocess.run([sys.executable, "-m", "lake.erasure"], cwd=ROOT,
                          env={**os.environ, **env_for(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bundles_scrubbed"] == {"v1": 1} and report["staging_deleted"] == [staged.name]

    for name in USER_TABLES:
        users, readable = users_in_every_version(lake, name)
        assert VICTIM not in users and readable >= 1, name
        assert KEEPER in set(lake.read(name).column("user_id").to_pylist()), name
    assert files_naming(tmp_path / "lake", VICTIM) == []
    assert files_naming(models, VICTIM) == []
    assert not staged.exists()
    bundle = read_bundle(models / "v1")  # checksums verified
    assert VICTIM not in bundle.user_ids.tolist() and KEEPER in bundle.user_ids.tolist()
    assert [e["user_id"] for e in lake.read("user_erasures").to_pylist()] == [VICTIM]

    server, client = start(tmp_path)  # the scrubbed bundle serves the others as before
    try:
        assert client.recommend(KEEPER, k=2).strategy == pb.STRATEGY_PERSONALISED
        assert client.recommend(VICTIM, k=2).strategy == pb.STRATEGY_FALLBACK
    finally:
        client.close()
        server.stop(grace=1)


def test_a_reload_racing_forget_user_cannot_miss_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    kb.build(models, "v1")
    kb.build(models, "v2", make_current=False)
    entered, release = threading.Event(), threading.Event()

    def slow_prepare(new: Any, old: Any) -> int:
        if new.version == "v2":
            entered.set()
            release.wait(30)
        return 0

    settings = load_settings(env={}, overrides={"model": {"dir": str(models)}})
    manager = ModelManager(settings, on_new_model=slow_prepare)
    manager.reload("v1")
    reload = threading.Thread(target=manager.reload, args=("v2",))
    reload.start()
    assert entered.wait(30)
    manager.forget(VICTIM)  # while v2 is being prepared from a bundle that knows the user
    release.set()
    reload.join(30)
    assert manager.current is not None and manager.current.version == "v2"
    assert manager.current.batch_user_vector(VICTIM) is None
    assert manager.current.batch_user_vector(KEEPER) is not None


@pytest.mark.reliability
def test_forget_user_leaves_no_trace_in_any_version_soak(tmp_path: Path) -> None:
    test_forget_user_then_purge_leaves_no_trace(tmp_path)
