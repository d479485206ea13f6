"""`make run REPLICAS=N`: N online replicas behind one HAProxy front door, sharing Redis.

Every replica is a `python -m online.server` process on the shared lake and model
directory with its own WAL directory (so its own node id), gRPC, admin and metrics ports.
HAProxy (Debian's 2.6) listens on `server.port` / `server.admin_port` and speaks HTTP/2
(gRPC) to both sides:
- Recommender calls are hashed on the `x-lambdarec-user` header the client library sets
  (consistent hashing: a user stays on one replica while it is up; calls without the
  header go round robin);
- a replica is in while its `/healthz` (on its metrics port) says SERVING: out after one
  failed check (every 250 ms), back after two; a connection refused is retried on another
  replica (`retries` + `redispatch`);
- a replica told to stop (SIGTERM) turns NOT_SERVING and keeps answering for
  `server.drain_s` (the fleet sets it to DRAIN_S) before its ports close, so its users'
  calls move to the others without a failed call;
- admin calls go round robin (the effects of ForgetUser reach all replicas through the
  fleet channel; `lake.reload_notice` sends model reloads to every replica).
A replica that dies is restarted on its WAL directory (its acknowledged events replay from
there). `var/run/fleet.json` (`fleet.run_dir`) lists the addresses and pids; Ctrl-C stops
the replicas first (each drains and flushes its WAL), then HAProxy and Redis.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lake.config import ENV_PREFIX, PROJECT_ROOT, ConfigError, Settings
from lake.fleet_file import FLEET_FILE
from online.metrics import HEALTH_PATH
from online.node_identity import NODE_FILE
from online.ports import free_port

log = logging.getLogger(__name__)

CHECK_INTER_MS = 250
DRAIN_S = 4 * CHECK_INTER_MS / 1000
"""How long a stopping replica answers after turning NOT_SERVING (a few check intervals)."""
READY_TIMEOUT_S = 600.0
INSTALL_HINT = "(`make java` as root installs it with infra/scripts/ensure_system.sh)"


class FleetError(RuntimeError):
    """A fleet part could not start; the message says which and why."""


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FleetError(f"{name} not found {INSTALL_HINT}")
    return path


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_port(host: str, port: int, proc: subprocess.Popen[Any], what: str,
               timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetError(f"{what} exited with status {proc.returncode} before serving")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FleetError(f"{what} did not listen on {_addr(host, port)} within {timeout_s:.0f} s")


def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen[Any] | None = None,
                 what: str = "server") -> None:
    """Until `target`'s gRPC health says SERVING (or `proc` exits: FleetError)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise FleetError(f"{what} exited with status {proc.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise FleetError(f"{what} on {target} was not SERVING within {timeout_s:.0f} s")


# -- Redis ------------------------------------------------------------------------------------
@dataclass
class RedisProcess:
    """Debian's `redis-server` as a child process on `host:port`, nothing persisted (the
    stream only carries what the lake and the WALs already hold)."""

    dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{_addr(self.host, self.port)}/0"

    def start(self, timeout_s: float = 30.0) -> RedisProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        self.proc = subprocess.Popen(
            [_binary("redis-server"), "--bind", self.host, "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.host, self.port, self.proc, "redis-server", timeout_s)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- HAProxy ----------------------------------------------------------------------------------
def render_haproxy(host: str, port: int, admin_port: int,
                   replicas: list[tuple[str, str, int]], *, dns: str | None = None,
                   written_by: str = "online/fleet.py (make run REPLICAS=N)") -> str:
    """HAProxy configuration: gRPC (h2c) on both sides, affinity on `x-lambdarec-user`,
    health from each replica's HTTP `/healthz`.

    `replicas`: (grpc address, admin address, health (metrics) port) of each replica.
    `dns`: a resolver (`ip:port`) for replicas named by host name whose address may
    change while HAProxy runs (containers): looked up at run time, and a replica that
    does not resolve yet is down instead of an error at start.
    """
    at = " resolvers dns init-addr none" if dns else ""

    def servers(kind: int, prefix: str) -> str:
        return "\n".join(
            f"    server {prefix}{i} {r[kind]} proto h2 check port {r[2]} check-proto h1 "
            f"inter {CHECK_INTER_MS}ms fall 1 rise 2{at}" for i, r in enumerate(replicas))

    resolvers = (f"\nresolvers dns\n    nameserver dns {dns}\n    hold valid 1s\n"
                 if dns else "")
    return f"""# written by {written_by}; do not edit
global
    # below the usual 20,000-descriptor limit of a shell (two per connection)
    maxconn 4096
{resolvers}
defaults
    mode http
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    # a refused connection (a replica that just died) is retried, the last try elsewhere
    retries 2
    option redispatch 1
    retry-on conn-failure
    # in while the replica's gRPC health is SERVING (HTTP form on its metrics port)
    option httpchk
    http-check send meth GET uri {HEALTH_PATH}
    http-check expect status 200

frontend recommender
    bind {_addr(host, port)} proto h2
    default_backend replicas

backend replicas
    # a user's calls stay on one replica while it is up (client library header)
    balance hdr(x-lambdarec-user)
    hash-type consistent
{servers(0, "r")}

frontend admin
    bind {_addr(host, admin_port)} proto h2
    default_backend admins

backend admins
    balance roundrobin
{servers(1, "a")}
"""


# -- the fleet --------------------------------------------------------------------------------
@dataclass
class Replica:
    index: int
    wal_dir: Path
    grpc: int
    admin: int
    metrics: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    node_id: str | None = None


@dataclass
class Fleet:
    """N replicas + HAProxy (+ Redis unless `fleet.redis_url` names one).

    Args:
        settings: the resolved settings; `server.port` / `admin_port` are the front door's.
        replicas: how many (`make run` serves 1 without a front door; the benchmark
            measures 1 behind it too).
        env: the environment for the replicas (default: this process's).
        restart: restart a replica that exits while the fleet runs.
    """

    settings: Settings
    replicas: int
    env: dict[str, str] | None = None
    restart: bool = True
    members: list[Replica] = field(default_factory=list)
    redis: RedisProcess | None = None
    haproxy: subprocess.Popen[bytes] | None = None
    redis_url: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _supervisor: threading.Thread | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.settings.fleet.run_dir

    @property
    def front_door(self) -> dict[str, str]:
        srv = self.settings.server
        return {"grpc": _addr(srv.host, srv.port), "admin": _addr(srv.host, srv.admin_port)}

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Start everything, wait until the front door serves; returns fleet.json's content."""
        if self.replicas < 1:
            raise ConfigError(f"REPLICAS: must be at least 1, got {self.replicas}")
        srv = self.settings.server
        if srv.node_id is not None:
            raise ConfigError("server.node_id: set, but each of the REPLICAS needs its own; "
                              "leave it null (each replica's WAL directory makes one)")
        if srv.tls_cert is not None:
            raise ConfigError("server.tls_cert: set, but the fleet's front door speaks plaintext "
                              "HTTP/2 to its replicas; with REPLICAS > 1 terminate TLS in front "
                              "of it (a load balancer) and leave server.tls_cert null")
        haproxy_bin = _binary("haproxy")  # both binaries checked before anything starts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis_url = self.settings.fleet.redis_url
            if not self.redis_url:
                self.redis = RedisProcess(self.run_dir / "redis", host=srv.host).start()
                self.redis_url = self.redis.url
            for i in range(self.replicas):
                wal = srv.wal_dir if i == 0 else srv.wal_dir.with_name(f"{srv.wal_dir.name}-{i}")
                # every replica gets a metrics port: the front door's health checks use it
                r = Replica(i, wal, free_port(srv.host), free_port(srv.host),
                            free_port(srv.host))
                self.members.append(r)
                self._spawn(r)
            for r in self.members:
                self._wait_replica(r, timeout_s)
            self._start_haproxy(haproxy_bin, timeout_s)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="fleet-supervisor",
                                                daemon=True)
            self._supervisor.start()
        return self.state()

    def _replica_env(self, r: Replica) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        for key, value in (("SERVER__PORT", r.grpc), ("SERVER__ADMIN_PORT", r.admin),
                           ("SERVER__METRICS_PORT", r.metrics), ("SERVER__WAL_DIR", r.wal_dir),
                           ("FLEET__REDIS_URL", self.redis_url)):
            env[f"{ENV_PREFIX}{key}"] = str(value)
        if self.settings.server.drain_s == 0:  # an operator's longer drain stays
            env[f"{ENV_PREFIX}SERVER__DRAIN_S"] = str(DRAIN_S)
        return env

    def _spawn(self, r: Replica) -> None:
        logf = open(self.run_dir / f"replica-{r.index}.log", "ab")  # noqa: SIM115 - kept open
        self._logs.append(logf)
        r.proc = subprocess.Popen([sys.executable, "-m", "online.server"], cwd=PROJECT_ROOT,
                                  env=self._replica_env(r), stdin=subprocess.DEVNULL,
                                  stdout=logf, stderr=logf, start_new_session=True)

    def _wait_replica(self, r: Replica, timeout_s: float) -> None:
        assert r.proc is not None
        what = f"replica {r.index} (log: {self.run_dir / f'replica-{r.index}.log'})"
        wait_serving(_addr(self.settings.server.host, r.grpc), timeout_s, r.proc, what)
        node = r.wal_dir / NODE_FILE
        r.node_id = node.read_text().strip() if node.exists() else None

    def _start_haproxy(self, binary: str, timeout_s: float) -> None:
        srv = self.settings.server
        cfg = self.run_dir / "haproxy.cfg"
        cfg.write_text(render_haproxy(srv.host, srv.port, srv.admin_port, [
            (_addr(srv.host, r.grpc), _addr(srv.host, r.admin), r.metrics)
            for r in self.members]))
        check = subprocess.run([binary, "-c", "-q", "-f", str(cfg)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise FleetError(f"haproxy refused {cfg}: {check.stderr.strip()}")
        logf = open(self.run_dir / "haproxy.log", "ab")  # noqa: SIM115 - kept open
        self._logs.append(logf)
        self.haproxy = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=logf, start_new_session=True)
        wait_serving(self.front_door["grpc"], timeout_s, self.haproxy,
                     f"haproxy (log: {self.run_dir / 'haproxy.log'})")

    # -- running -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        srv = self.settings.server
        return {
            "front_door": {**self.front_door,
                           "pid": self.haproxy.pid if self.haproxy else None},
            "redis": {"url": self.redis_url,
                      "pid": self.redis.proc.pid if self.redis and self.redis.proc else None},
            "replicas": [{
                "index": r.index, "grpc": _addr(srv.host, r.grpc),
                "admin": _addr(srv.host, r.admin),
                "metrics": _addr(srv.host, r.metrics),
                "pid": r.proc.pid if r.proc else None, "node_id": r.node_id,
                "wal_dir": str(r.wal_dir), "restarts": r.restarts,
            } for r in self.members],
        }

    def _write_state(self) -> None:
        path = self.run_dir / FLEET_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        tmp.replace(path)  # readers never see half a file

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self._stop.is_set():
                    return
                for r in self.members:
                    if r.proc is not None and r.proc.poll() is not None:
                        log.warning("replica %d exited with status %s: restarting it on %s",
                                    r.index, r.proc.returncode, r.wal_dir)
                        self._spawn(r)
                        r.restarts += 1  # after the spawn: r.proc is the new process now
                        self._write_state()

    def wait_replica(self, index: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until replica `index` (e.g. restarted after a crash) serves again."""
        self._wait_replica(self.members[index], timeout_s)
        with self._lock:
            self._write_state()

    def stop(self, grace_s: float | None = None) -> None:
        """Replicas first (SIGTERM: drain, flush the WAL), then HAProxy, then Redis."""
        self._stop.set()
        with self._lock:
            grace = (self.settings.server.flush_interval_s if grace_s is None else grace_s) + 60
            for r in self.members:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
            for r in self.members:
                if r.proc is not None:
                    try:
                        r.proc.wait(timeout=grace)
                    except subprocess.TimeoutExpired:
                        log.error("replica %d did not stop within %.0f s: killed", r.index, grace)
                        r.proc.kill()
                        r.proc.wait()
            if self.haproxy is not None and self.haproxy.poll() is None:
                self.haproxy.terminate()
                self.haproxy.wait(timeout=10)
            if self.redis is not None:
                self.redis.stop()
            for f in self._logs:
                f.close()
            (self.run_dir / FLEET_FILE).unlink(missing_ok=True)
