"""A Spark standalone cluster on this machine: one master + N workers on 127.0.0.1.

pip's pyspark ships no `sbin/start-*.sh`, but `bin/spark-class` starts the daemons:

    spark-class org.apache.spark.deploy.master.Master --host 127.0.0.1 --port 7077 ...
    spark-class org.apache.spark.deploy.worker.Worker --cores 1 --memory 2g spark://...

Each daemon runs in its own session (process group), so `stop()` ends it and every child
(the JVM under the launcher script) with one signal to the group. Executors run this
interpreter (`PYSPARK_PYTHON`), bind to 127.0.0.1 (`SPARK_LOCAL_IP`), and see the same
files as the driver (same machine), so the lake path works as is.

    python -m infra.spark_cluster start [--workers 2 --cores 1 --memory 2g]   # prints JSON
    python -m infra.spark_cluster status
    python -m infra.spark_cluster stop

The CLI keeps the pids in `var/spark-cluster/cluster.json`; logs go next to it.
Drivers connect with `LAMBDAREC__SPARK__MASTER=spark://127.0.0.1:7077` or `--master`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = PROJECT_ROOT / "var" / "spark-cluster"
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


class ClusterError(RuntimeError):
    """The cluster could not be started (port taken, daemon died, workers missing...)."""


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def master_status(webui_port: int, host: str = HOST) -> dict[str, Any] | None:
    """The master's `/json/` status (workers, cores, apps), or None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://{host}:{webui_port}/json/", timeout=2) as r:
            return json.loads(r.read().decode())
    except (OSError, ValueError):
        return None


@dataclass
class ClusterHandle:
    """A running standalone cluster started by `start_cluster`."""

    master_url: str
    webui_url: str
    pids: list[int]
    """Master first, then the workers; each is the leader of its own process group."""
    log_dir: Path
    webui_port: int
    workers: int
    stopped: bool = field(default=False)

    def alive_workers(self) -> int:
        st = master_status(self.webui_port)
        return int(st.get("aliveworkers", 0)) if st else 0

    def stop(self, timeout: float = 20.0) -> None:
        """Stop workers, then the master (SIGTERM to each process group, SIGKILL if needed)."""
        if self.stopped:
            return
        for pid in reversed(self.pids):
            _stop_group(pid, timeout)
        self.stopped = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log_dir"] = str(self.log_dir)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterHandle:
        return cls(d["master_url"], d["webui_url"], list(d["pids"]), Path(d["log_dir"]),
                   int(d["webui_port"]), int(d["workers"]), bool(d.get("stopped", False)))

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_group(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def daemon_env(python: str | None = None) -> dict[str, str]:
    """Environment of the daemons: SPARK_HOME, loopback binding and the venv's Python."""
    python = python or sys.executable
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(spark_home()),
        SPARK_LOCAL_IP=HOST,
        SPARK_MASTER_HOST=HOST,
        PYSPARK_PYTHON=python,
        PYSPARK_DRIVER_PYTHON=python,
        PATH=f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}",
        SPARK_NO_DAEMONIZE="1",
    )
    return env


def _spawn(args: list[str], env: dict[str, str], log: Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(log.parent),
        )
    return proc.pid


def start_cluster(
    workers: int = 2,
    cores: int = 1,
    memory: str = "2g",
    *,
    port: int = 7077,
    webui_port: int = 8090,
    log_dir: Path | None = None,
    timeout: float = 90.0,
) -> ClusterHandle:
    """Start a master and `workers` workers on 127.0.0.1 and wait until all registered.

    Args:
        workers: number of worker daemons.
        cores: cores each worker offers.
        memory: memory each worker offers to executors (e.g. "2g").
        port: master RPC port (the master URL is `spark://127.0.0.1:<port>`).
        webui_port: master web UI port (workers use the following ports).
        log_dir: where the daemons' logs and work dirs go (default var/spark-cluster).
        timeout: seconds to wait for the master and all workers.

    Returns:
        A handle; call `stop()` (or use it as a context manager) to end the daemons.

    Raises:
        ClusterError: the port is in use, a daemon exited, or workers did not register
            in time (whatever was started is stopped again).
    """
    if workers < 1 or cores < 1:
        raise ValueError(f"workers and cores must be >= 1, got {workers} and {cores}")
    if _port_open(HOST, port):
        raise ClusterError(f"{HOST}:{port} is already in use (a cluster already running? "
                           "python -m infra.spark_cluster stop)")
    log_dir = Path(log_dir or DEFAULT_DIR)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = daemon_env()
    spark_class = str(spark_home() / "bin" / "spark-class")
    master_url = f"spark://{HOST}:{port}"
    handle = ClusterHandle(master_url, f"http://{HOST}:{webui_port}", [], log_dir,
                           webui_port, workers)
    try:
        handle.pids.append(_spawn(
            [spark_class, MASTER_CLASS, "--host", HOST, "--port", str(port),
             "--webui-port", str(webui_port)],
            env, log_dir / "master.log"))
        _wait(lambda: master_status(webui_port) is not None, handle, timeout, "master")
        for n in range(workers):
            work = log_dir / f"worker-{n + 1}"
            work.mkdir(exist_ok=True)
            handle.pids.append(_spawn(
                [spark_class, WORKER_CLASS, "--host", HOST, "--cores", str(cores),
                 "--memory", memory, "--webui-port", str(webui_port + 1 + n),
                 "--work-dir", str(work), master_url],
                env, log_dir / f"worker-{n + 1}.log"))
        _wait(lambda: handle.alive_workers() >= workers, handle, timeout,
              f"{workers} workers")
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait(ready: Any, handle: ClusterHandle, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p for p in handle.pids if not _alive(p) or _exited(p)]
        if dead:
            raise ClusterError(f"{what}: daemon(s) {dead} exited; see logs in {handle.log_dir}")
        time.sleep(0.5)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s; see logs in {handle.log_dir}")


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


# -- CLI -----------------------------------------------------------------------------------
def _state_path(log_dir: Path) -> Path:
    return log_dir / STATE_FILE


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.spark_cluster",
                                description="Start/stop a local Spark standalone cluster.")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--memory", default="2g")
    p.add_argument("--port", type=int, default=7077)
    p.add_argument("--webui-port", dest="webui_port", type=int, default=8090)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="logs + state file")
    args = p.parse_args(list(argv) if argv is not None else None)
    state = _state_path(args.dir)

    if args.action == "start":
        try:
            h = start_cluster(args.workers, args.cores, args.memory, port=args.port,
                              webui_port=args.webui_port, log_dir=args.dir)
        except ClusterError as exc:
            sys.stderr.write(f"spark_cluster: {exc}\n")
            return 1
        state.write_text(json.dumps(h.to_dict(), indent=2))
        print(json.dumps({"started": True, **h.to_dict()}))
        return 0
    if not state.exists():
        sys.stderr.write(f"spark_cluster: no cluster state at {state}\n")
        return 1 if args.action == "stop" else 0
    h = ClusterHandle.from_dict(json.loads(state.read_text()))
    if args.action == "status":
        st = master_status(h.webui_port)
        print(json.dumps({"master_url": h.master_url, "running": st is not None,
                          "alive_workers": int(st.get("aliveworkers", 0)) if st else 0,
                          "pids": h.pids}))
        return 0
    h.stop()
    state.unlink()
    print(json.dumps({"stopped": True, "pids": h.pids}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
