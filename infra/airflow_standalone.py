"""Run `airflow standalone` for this project: `make airflow` / `python -m infra.airflow_standalone`.

What it sets up (all through environment variables, nothing is written to airflow.cfg):

* `AIRFLOW_HOME=<project>/var/airflow` (SQLite metadata DB inside it), DAGs from
  `<project>/dags`, no example DAGs, `parallelism` 2 (the default forks 32 workers).
* UI + REST API on http://127.0.0.1:8080 (`--port`); the execution API URL follows the port.
* Simple auth manager with user `admin` and a password kept in
  `$AIRFLOW_HOME/simple_auth_manager_passwords.json` (generated once, then fixed), printed
  with the URL when Airflow is healthy. A fixed JWT secret lives next to it.
* The Spark connection `settings.airflow.spark_conn_id` (default `spark_default`) as
  `AIRFLOW_CONN_SPARK_DEFAULT`, master `settings.spark.master` (`local[*]`) or
  `--spark-master spark://127.0.0.1:7077`.
* The venv's `bin` first on PATH (`airflow standalone` spawns `airflow` from PATH and
  hangs without it; the tasks find `spark-submit` there too), preceded by
  `infra/airflow_bin/airflow`, which starts the scheduler and triggerer without their task
  log servers: Airflow binds those to every interface (8793 / 8794) with no setting to
  change it, and the API server reads the logs from AIRFLOW_HOME here. So everything
  listens on 127.0.0.1 only.

Stopping (see STACK.md): Airflow runs in its own session with SIGINT restored; Ctrl-C (or
SIGTERM) on this launcher sends SIGINT to the standalone parent, which stops its
components; whatever is still alive after the grace period gets SIGTERM, then SIGKILL,
as a whole session. `stop(pid)` does the same for tests and scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = PROJECT_ROOT / "var" / "airflow"
DAGS_FOLDER = PROJECT_ROOT / "dags"
AIRFLOW_SHIM_DIR = PROJECT_ROOT / "infra" / "airflow_bin"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
USERNAME = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"
JWT_SECRET_FILE = "jwt_secret"
PID_FILE = "standalone.pid"


@dataclass
class StandaloneConfig:
    """Where and how Airflow runs."""

    home: Path = DEFAULT_HOME
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    parallelism: int = 2
    spark_master: str | None = None
    """None: `settings.spark.master` (local[*] by default)."""
    spark_conn_id: str | None = None
    """None: `settings.airflow.spark_conn_id`."""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def venv_bin() -> Path:
    """The bin directory of this interpreter (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def ensure_home(home: Path) -> tuple[str, str]:
    """Create AIRFLOW_HOME with a fixed admin password and JWT secret; return both.

    The password is generated on first use and kept, so the login stays the same across
    restarts (the simple auth manager's own file would be regenerated per home).
    """
    home.mkdir(parents=True, exist_ok=True)
    pw_file = home / PASSWORDS_FILE
    passwords: dict[str, str] = {}
    if pw_file.exists():
        try:
            passwords = json.loads(pw_file.read_text() or "{}")
        except ValueError:
            passwords = {}
    if not passwords.get(USERNAME):
        passwords[USERNAME] = secrets.token_urlsafe(12)
        pw_file.write_text(json.dumps(passwords) + "\n")
        pw_file.chmod(0o600)
    secret_file = home / JWT_SECRET_FILE
    if not secret_file.exists() or len(secret_file.read_text().strip()) < 64:
        secret_file.write_text(secrets.token_urlsafe(64) + "\n")
        secret_file.chmod(0o600)
    return passwords[USERNAME], secret_file.read_text().strip()


def read_password(home: Path = DEFAULT_HOME) -> str:
    """The admin password of the Airflow started with `home`."""
    return str(json.loads((home / PASSWORDS_FILE).read_text())[USERNAME])


def spark_connection(master: str) -> str:
    """JSON Airflow connection for a Spark master (`local[*]`, `spark://host:7077`, `yarn`)."""
    if master.startswith("spark://") and master.count(":") == 2:
        host, port = master.rsplit(":", 1)
        return json.dumps({"conn_type": "spark", "host": host, "port": int(port)})
    return json.dumps({"conn_type": "spark", "host": master})


def airflow_env(cfg: StandaloneConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment `airflow standalone` runs with."""
    from lake.config import load_settings

    env = dict(os.environ if base is None else base)
    env.update(cfg.extra_env)
    settings = load_settings(env=env)
    password, jwt_secret = ensure_home(cfg.home)
    del password  # the file is what Airflow reads
    conn_id = cfg.spark_conn_id or settings.airflow.spark_conn_id
    master = cfg.spark_master or settings.spark.master
    path_parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    bin_dir = str(venv_bin())
    pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        {
            "AIRFLOW_HOME": str(cfg.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(cfg.parallelism),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(cfg.home / PASSWORDS_FILE),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{cfg.base_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{cfg.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": cfg.host,
            "AIRFLOW__API__PORT": str(cfg.port),
            "AIRFLOW__API__BASE_URL": cfg.base_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            f"AIRFLOW_CONN_{conn_id.upper()}": spark_connection(master),
            "LAMBDAREC_AIRFLOW_EXECUTABLE": str(venv_bin() / "airflow"),
            "PATH": os.pathsep.join([str(AIRFLOW_SHIM_DIR), bin_dir,
                                     *[p for p in path_parts
                                       if p not in (bin_dir, str(AIRFLOW_SHIM_DIR))]]),
            "PYTHONPATH": os.pathsep.join(
                [str(PROJECT_ROOT), *[p for p in pythonpath if p != str(PROJECT_ROOT)]]
            ),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": env.get("NO_COLOR", "1"),
        }
    )
    return env


def _restore_sigint() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(
    cfg: StandaloneConfig,
    *,
    stdout: IO[Any] | int | None = None,
    base_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `airflow standalone` in its own session (pid == pgid == sid); don't wait."""
    env = airflow_env(cfg, base_env)
    airflow = venv_bin() / "airflow"
    if not airflow.exists():
        raise FileNotFoundError(f"{airflow} not found: run `make setup`")
    proc = subprocess.Popen(
        [str(airflow), "standalone"],
        cwd=str(PROJECT_ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        start_new_session=True,
        preexec_fn=_restore_sigint,
    )
    (cfg.home / PID_FILE).write_text(f"{proc.pid}\n")
    return proc


def is_healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when `/api/v2/monitor/health` says metadatabase and scheduler are healthy."""
    try:
        with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=timeout_s) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return all(
        (body.get(part) or {}).get("status") == "healthy"
        for part in ("metadatabase", "scheduler")
    )


def wait_healthy(
    base_url: str, timeout_s: float = 120.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until Airflow is healthy; raise if it exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"airflow standalone exited with code {proc.returncode}")
        if is_healthy(base_url):
            return
        time.sleep(1.0)
    raise TimeoutError(f"Airflow at {base_url} not healthy after {timeout_s:.0f} s")


def get_token(base_url: str, username: str, password: str, timeout_s: float = 10.0) -> str:
    """A JWT for the REST API (`POST /auth/token`)."""
    req = urllib.request.Request(
        f"{base_url}/auth/token",
        data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return str(json.loads(r.read())["access_token"])


# --------------------------------------------------------------------------- stopping


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces/parens
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 4 and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return sorted(pids)


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(sid: int, timeout_s: float, reap: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reap is not None:
            reap.poll()
        if not session_pids(sid):
            return True
        time.sleep(0.2)
    return not session_pids(sid)


def stop(
    target: int | subprocess.Popen[bytes], *, grace_s: float = 30.0, term_s: float = 10.0
) -> list[int]:
    """Stop the standalone started by `start` (a Popen or its pid) and all its processes.

    1. SIGINT to the standalone parent: it terminates its components and exits.
    2. After `grace_s`, SIGTERM to every process left in its session (children first),
       then the parent; after `term_s`, SIGKILL to what remains.

    Returns the pids still alive afterwards (empty on success).
    """
    proc = target if isinstance(target, subprocess.Popen) else None
    pid = proc.pid if proc is not None else int(target)  # type: ignore[arg-type]
    sid = pid  # start_new_session: the parent leads its own session
    if not session_pids(sid):
        if proc is not None:
            proc.poll()
        return []
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    if _wait_gone(sid, grace_s, proc):
        return []
    left = session_pids(sid)
    _signal_all([p for p in left if p != pid], signal.SIGTERM)
    _signal_all([pid], signal.SIGTERM)
    if _wait_gone(sid, term_s, proc):
        return []
    _signal_all(session_pids(sid), signal.SIGKILL)
    _wait_gone(sid, 5.0, proc)
    return session_pids(sid)


def stop_from_pid_file(home: Path = DEFAULT_HOME) -> list[int]:
    """Stop the Airflow whose pid `start` wrote into `home` (for scripts)."""
    pid_file = home / PID_FILE
    if not pid_file.exists():
        return []
    left = stop(int(pid_file.read_text().strip()))
    if not left:
        pid_file.unlink(missing_ok=True)
    return left


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infra.airflow_standalone", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", choices=["start", "stop"], default="start",
                   help="start (foreground, Ctrl-C stops it) or stop (a started one, by pid file)")
    p.add_argument("--home", type=Path, default=Path(os.environ.get("LAMBDAREC_AIRFLOW_HOME",
                                                                    DEFAULT_HOME)))
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--parallelism", type=int, default=2)
    p.add_argument("--spark-master", default=None,
                   help="master of the Spark connection (default: settings spark.master)")
    args = p.parse_args(argv)
    home = args.home.resolve()

    if args.command == "stop":
        left = stop_from_pid_file(home)
        print("stopped" if not left else f"still running: {left}")
        return 0 if not left else 1

    cfg = StandaloneConfig(home=home, port=args.port, parallelism=args.parallelism,
                           spark_master=args.spark_master)
    proc = start(cfg)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        wait_healthy(cfg.base_url, timeout_s=180.0, proc=proc)
        print(
            "\n"
            f"  Airflow is up:  {cfg.base_url}\n"
            f"  login:          {USERNAME} / {read_password(home)}\n"
            f"  AIRFLOW_HOME:   {home}\n"
            f"  DAGs:           {DAGS_FOLDER}  (lambdarec_retrain, lambdarec_rollback)\n"
            "  Ctrl-C stops Airflow and everything it started.\n",
            flush=True,
        )
        return proc.wait()
    except KeyboardInterrupt:
        print("\nstopping Airflow ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        left = stop(proc)
        if left:
            print(f"warning: processes still running: {left}", file=sys.stderr)
        (home / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
