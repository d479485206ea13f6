"""`airflow standalone` as `make airflow` runs it: REST trigger of lambdarec_retrain, clean stop.

Starts real processes (Airflow's scheduler, DAG processor, API server, triggerer, and the
Spark jobs the DAG submits), each on 127.0.0.1 with a throw-away AIRFLOW_HOME and lake.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from tiny_pipeline import tiny_pipeline_env  # noqa: E402

from infra import airflow_standalone as sa  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAG_ID = "lambdarec_retrain"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from exc


# --------------------------------------------------------------------------- unit


def test_environment_points_airflow_at_this_project(tmp_path: Path) -> None:
    cfg = sa.StandaloneConfig(home=tmp_path / "af", port=18123, spark_master="local[2]")
    env = sa.airflow_env(cfg, base={"PATH": "/usr/bin", "LAMBDAREC__SPARK__MASTER": "local[1]"})
    assert env["AIRFLOW_HOME"] == str(tmp_path / "af")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(PROJECT_ROOT / "dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 4
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18123"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    # the log-server-less shim first (see infra/airflow_bin/airflow), then the venv
    assert env["PATH"].split(os.pathsep)[:2] == [str(sa.AIRFLOW_SHIM_DIR),
                                                 str(Path(sys.executable).parent)]
    assert shutil.which("airflow", path=env["PATH"]) == str(sa.AIRFLOW_SHIM_DIR / "airflow")
    assert env["LAMBDAREC_AIRFLOW_EXECUTABLE"] == str(Path(sys.executable).parent / "airflow")
    conn = json.loads(env["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert conn == {"conn_type": "spark", "host": "local[2]"}
    # the password file is fixed: a second call keeps the same login
    first = sa.read_password(tmp_path / "af")
    sa.airflow_env(cfg, base={"PATH": "/usr/bin"})
    assert sa.read_password(tmp_path / "af") == first and len(first) >= 12


def test_spark_connection_for_a_standalone_master() -> None:
    assert json.loads(sa.spark_connection("spark://127.0.0.1:7077")) == {
        "conn_type": "spark", "host": "spark://127.0.0.1", "port": 7077}
    assert json.loads(sa.spark_connection("local[*]")) == {"conn_type": "spark",
                                                           "host": "local[*]"}


def test_stop_ends_a_whole_session_that_ignores_sigint(tmp_path: Path) -> None:
    """A parent that ignores SIGINT, with a child: stop() still leaves nothing behind."""
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN);"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
              "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(sa.session_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(sa.session_pids(proc.pid)) == 2
    t0 = time.monotonic()
    assert sa.stop(proc, grace_s=1.0, term_s=5.0) == []
    assert sa.session_pids(proc.pid) == []
    assert time.monotonic() - t0 < 15


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # /proc/net: 127.0.0.1, ::1


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(hex address, port) of every TCP socket the processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        except OSError:  # the process exited meanwhile
            continue
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].rsplit(":", 1)
                out.add((addr, int(port, 16)))
    return out


@pytest.mark.timeout(600)
def test_standalone_listens_on_loopback_only(tmp_path: Path) -> None:
    """The API server on 127.0.0.1 and no task-log servers (Airflow binds those to every
    interface on 8793 / 8794)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LAMBDAREC__"))}
    env.update(tiny_pipeline_env(tmp_path))
    cfg = sa.StandaloneConfig(home=tmp_path / "airflow", port=port, spark_master="local[2]")
    log_path = tmp_path / "standalone.log"
    with log_path.open("wb") as log:
        proc = sa.start(cfg, stdout=log, base_env=env)
    try:
        sa.wait_healthy(cfg.base_url, timeout_s=240, proc=proc)
        time.sleep(5)  # the triggerer comes up after the scheduler
        listening = _listening(sa.session_pids(proc.pid))
        assert ("0100007F", port) in listening
        assert {a for a, _ in listening} <= LOOPBACK, (listening,
                                                       log_path.read_text()[-3000:])
        assert not {p for _, p in listening} & {8793, 8794}
        text = log_path.read_text(errors="replace")
        assert "triggerer" in text and "scheduler" in text  # both components did start
    finally:
        assert sa.stop(proc) == []


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(1500)
def test_standalone_runs_the_retrain_dag_from_the_rest_api(tmp_path: Path) -> None:
    port = _free_port()
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LAMBDAREC__"))}
    env.update(tiny_pipeline_env(tmp_path))
    seed = subprocess.run([sys.executable, "-m", "lake.load"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr[-3000:]

    cfg = sa.StandaloneConfig(home=tmp_path / "airflow", port=port, spark_master="local[2]")
    log_path = tmp_path / "standalone.log"
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = sa.start(cfg, stdout=log, base_env=env)
    try:
        sa.wait_healthy(cfg.base_url, timeout_s=240, proc=proc)
        timings["healthy"] = time.monotonic() - t0
        token = sa.get_token(cfg.base_url, sa.USERNAME, sa.read_password(cfg.home))

        # The DAG must have been parsed before it can be unpaused / triggered.
        deadline = time.monotonic() + 180
        while True:
            dags = _api(cfg.base_url, token, "GET", "/api/v2/dags?dag_id_pattern=lambdarec")
            if any(d["dag_id"] == DAG_ID for d in dags["dags"]):
                break
            assert time.monotonic() < deadline, "lambdarec_retrain never showed up"
            time.sleep(2)
        errors = _api(cfg.base_url, token, "GET", "/api/v2/importErrors")
        assert errors["total_entries"] == 0, errors

        # Trigger for yesterday's logical date *before* unpausing: the scheduler then finds
        # that date's run already there and does not add a scheduled one (one run per date).
        as_of = date.today() - timedelta(days=1)
        logical = datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC)
        conf = {"lookback_days": 31, "factors": 16, "iterations": 5, "gate_margin": -0.9}
        run = _api(cfg.base_url, token, "POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                   {"logical_date": logical.isoformat(), "conf": conf})
        run_id = run["dag_run_id"]
        _api(cfg.base_url, token, "PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})

        deadline = time.monotonic() + 1200
        state = run["state"]
        while state not in ("success", "failed"):
            assert time.monotonic() < deadline, f"run {run_id} still {state}"
            time.sleep(5)
            state = _api(cfg.base_url, token, "GET",
                         f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        timings["run"] = time.monotonic() - t0 - timings["healthy"]
        tis = _api(cfg.base_url, token, "GET",
                   f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
        assert state == "success", (states, log_path.read_text(errors="replace")[-6000:])
        assert set(states.values()) == {"success"}, states

        xcom = _api(cfg.base_url, token, "GET",
                    f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/publish/"
                    "xcomEntries/return_value?deserialize=true")["value"]
        published = json.loads(xcom) if isinstance(xcom, str) else xcom
        assert published["accepted"] is True
        version = published["version"]
        assert version.startswith(f"v{as_of:%Y%m%d}-")
        # The UI's log view reads this endpoint: with the task-log servers skipped
        # (infra/airflow_bin/airflow) the API server must read the log files itself.
        task_log = _api(cfg.base_url, token, "GET",
                        f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/publish/"
                        "logs/1?full_content=true")
        assert f"publish {version}: ACCEPTED" in json.dumps(task_log["content"])
        assert (models / "CURRENT").read_text().strip() == version
        assert (models / "reports" / version / "report.md").exists()
        runs = _api(cfg.base_url, token, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns")
        assert [r["dag_run_id"] for r in runs["dag_runs"]] == [run_id]

        # Clear plan -> publish -> notify of the same run: they rerun and rewrite the same
        # version (publish reuses its bundle and keeps its decision); no second bundle.
        t_clear = time.monotonic()
        _api(cfg.base_url, token, "POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
            "dry_run": False, "only_failed": False, "reset_dag_runs": True,
            "dag_run_id": run_id, "task_ids": ["plan", "publish", "notify_reload"],
            "include_downstream": False, "include_upstream": False,
        })
        ti_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
        while True:
            assert time.monotonic() < deadline, "cleared tasks never reran"
            time.sleep(3)
            tis = {ti["task_id"]: ti for ti in
                   _api(cfg.base_url, token, "GET", ti_path)["task_instances"]}
            notify = tis["notify_reload"]
            if notify["try_number"] >= 2 and notify["state"] in ("success", "failed"):
                break
        timings["rerun"] = time.monotonic() - t_clear
        assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(tis, "success")
        assert tis["publish"]["try_number"] >= 2 and tis["train"]["try_number"] == 1
        rerun = _api(cfg.base_url, token, "GET",
                     f"{ti_path}/publish/xcomEntries/return_value?deserialize=true")["value"]
        rerun = json.loads(rerun) if isinstance(rerun, str) else rerun
        assert (rerun["version"], rerun["accepted"], rerun["bundle_reused"]) == (
            version, True, True)
        bundles = sorted(p.name for p in models.iterdir() if p.is_dir() and p.name[0] == "v")
        assert bundles == [version]
        assert (models / "CURRENT").read_text().strip() == version
    finally:
        t_stop = time.monotonic()
        left = sa.stop(proc)
        timings["stop"] = time.monotonic() - t_stop
        print(f"standalone timings (s): { {k: round(v, 1) for k, v in timings.items()} }")
    assert left == []
    assert sa.session_pids(proc.pid) == []
    assert proc.returncode is not None
