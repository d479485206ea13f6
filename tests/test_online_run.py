"""`make run` on an empty lake: the first model is trained, then the server runs without
the pipeline's Spark JVM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import tiny_pipeline_env

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                out[child] = cmd.get(child, "")
                frontier.append(child)
    return out


@pytest.mark.slow
def test_first_run_trains_and_serves_without_a_spark_jvm(tmp_path: Path) -> None:
    env = {**os.environ, **tiny_pipeline_env(tmp_path),
           "LAMBDAREC__SERVER__PORT": "0", "LAMBDAREC__SERVER__ADMIN_PORT": "0",
           "LAMBDAREC__SERVER__METRICS_PORT": "0", "LAMBDAREC__TUNE__ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "online.run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        started = None
        for line in proc.stdout:
            if line.startswith("{") and '"ports"' in line:
                started = json.loads(line)
                break
        assert started is not None and started["model"], "the server never came up"
        javas = {p: c for p, c in descendants(proc.pid).items() if "java" in c.split(" ")[0]}
        assert not javas, f"the server keeps a JVM: {javas}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
