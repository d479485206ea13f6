"""A real standalone cluster (master + 2 workers on 127.0.0.1) running the pipeline CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.spark_cluster import start_cluster
from lake.bundle import current_version
from lake.tables import Lake

ROOT = Path(__file__).resolve().parent.parent


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _ports() -> tuple[int, int]:
    if _free(7077) and _free(8090):
        return 7077, 8090
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def _pipeline_on_cluster(tmp_path: Path, overrides: dict[str, str], *, memory: str,
                         timeout: int) -> dict:
    """Run the pipeline CLI against a fresh 2-worker standalone cluster; its JSON line."""
    port, webui = _ports()
    cluster = start_cluster(workers=2, cores=1, memory=memory, port=port, webui_port=webui,
                            log_dir=tmp_path / "cluster", timeout=180)
    try:
        assert cluster.master_url == f"spark://127.0.0.1:{port}"
        assert cluster.alive_workers() == 2
        env = {
            **os.environ,
            "LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
            "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
            "LAMBDAREC__SPARK__DRIVER_MEMORY": "1g",
            "LAMBDAREC__SPARK__SHUFFLE_PARTITIONS": "2",
            **overrides,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "spark_jobs.pipeline", "--master", cluster.master_url,
             "--data", "synthetic"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stdout
        out = json.loads(lines[0])
        assert out["master"] == cluster.master_url
        # the executors did the work: the application ran on this master
        apps = json.loads(
            __import__("urllib.request").request.urlopen(
                f"http://127.0.0.1:{webui}/json/", timeout=5).read())
        assert apps.get("completedapps") or apps.get("activeapps")
    finally:
        cluster.stop()
    for pid in cluster.pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_on_a_standalone_cluster(tmp_path):
    out = _pipeline_on_cluster(tmp_path, {
        "LAMBDAREC__SPARK__EXECUTOR_MEMORY": "1g",
        "LAMBDAREC__DATA__SYNTHETIC_EVENTS": "5000",
        "LAMBDAREC__DATA__SYNTHETIC_USERS": "300",
        "LAMBDAREC__DATA__SYNTHETIC_ITEMS": "150",
        "LAMBDAREC__TRAIN__FACTORS": "16",
        "LAMBDAREC__TRAIN__REGULARIZATION": "1.0",
        "LAMBDAREC__TRAIN__ALPHA": "2.0",
        "LAMBDAREC__EVALUATE__SPLIT": "random",
    }, memory="2g", timeout=480)
    assert out["accepted"] is True, out["reason"]
    assert current_version(tmp_path / "models") == out["version"]
    runs = Lake(tmp_path / "lake").read("model_runs").to_pylist()
    assert [(r["model_version"], r["status"]) for r in runs if r["status"] != "trial"] \
        == [(out["version"], "current")]
    assert sum(r["status"] == "trial" for r in runs) == out["tune"]["trials"] >= 1


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_on_a_standalone_cluster_at_two_million_events(tmp_path):
    """Issue-size data through the executors: every event compacted once, the gate passes."""
    out = _pipeline_on_cluster(tmp_path, {
        "LAMBDAREC__SPARK__EXECUTOR_MEMORY": "2g",
        "LAMBDAREC__DATA__SYNTHETIC_EVENTS": "2000000",
        "LAMBDAREC__DATA__SYNTHETIC_USERS": "50000",
        "LAMBDAREC__DATA__SYNTHETIC_ITEMS": "20000",
        "LAMBDAREC__TUNE__ENABLED": "false",
    }, memory="3g", timeout=1500)
    counts = out["counts"]
    assert counts["bronze_rows"] == counts["silver_rows"] == 2_000_000
    assert out["accepted"] is True, out["reason"]
    print(f"2M events on the cluster: {out['seconds']} s, steps {out['steps_seconds']}")
