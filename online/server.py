"""The online server: public Recommender port + admin port, health, reflection, metrics.

`create_server(settings)` builds everything and returns `(server, ports)` without
blocking (tests bind port 0); `main()` is the process entry point (`python -m
online.server`). Shutdown is graceful: health goes NOT_SERVING, both gRPC servers stop
with a grace period, then the ingest pipeline flushes its WAL to bronze.
"""

from __future__ import annotations

import os

# Serving processes answer single queries: one BLAS / OpenMP thread each, set before numpy
# is imported (STACK.md: faiss' bundled OpenBLAS follows OMP_NUM_THREADS).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent import futures  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from lake import foldin  # noqa: E402
from lake.bundle import current_version  # noqa: E402
from lake.config import ConfigError, Settings, load_settings  # noqa: E402
from lake.erasure import erased_users  # noqa: E402
from lake.experiments import ExperimentStore, experiments_file  # noqa: E402
from lake.tables import Lake  # noqa: E402
from lake.training_cut import trained_from  # noqa: E402
from online.auth import admin_guard, public_guard  # noqa: E402
from online.catalog import Catalog  # noqa: E402
from online.experiment_arms import ExperimentArms  # noqa: E402
from online.fleet_channel import FleetChannel, PublishingIngest, ReplicaApplier  # noqa: E402
from online.ingest import APP_PREFIX, IngestPipeline  # noqa: E402
from online.latency import favour_requests  # noqa: E402
from online.loaded_model import LoadedModel  # noqa: E402
from online.metrics import Metrics, configure_logging  # noqa: E402
from online.model_manager import ModelManager  # noqa: E402
from online.node_identity import NodeIdentityError  # noqa: E402
from online.pb import admin_pb2_grpc, recommender_pb2_grpc  # noqa: E402
from online.ports import PortInUse, ensure_free  # noqa: E402
from online.rate_limits import RateLimits  # noqa: E402
from online.recommender import Recommender  # noqa: E402
from online.service import (  # noqa: E402
    UNDECODABLE_LOG_INTERVAL_S,
    AdminServicer,
    EveryInterval,
    RecommenderServicer,
    ServiceInterceptor,
    Validator,
    service_names,
)
from online.state import OnlineState  # noqa: E402
from online.tls import server_credentials  # noqa: E402
from online.warm_start import latest_users, replay, restore_popularity  # noqa: E402

log = logging.getLogger(__name__)


def limit_threads() -> None:
    """One FAISS/BLAS thread in this process (faiss parallelises over queries, not in one)."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1)


@dataclass
class OnlineServer:
    settings: Settings
    grpc_server: grpc.Server
    admin_server: grpc.Server
    health: health.HealthServicer
    admin_health: health.HealthServicer
    manager: ModelManager
    engine: Recommender
    ingest: Any
    metrics: Metrics
    lake: Lake
    metrics_enabled: bool = True
    ports: dict[str, int] = field(default_factory=dict)
    public_key: str | None = None
    """A key with every scope, valid in this process only (the console's), or None when
    the public port needs none (`server.auth: none`)."""
    _stop_poll: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _serving: threading.Event = field(default_factory=threading.Event)
    """Set while both gRPC servers are started and not shutting down (the HTTP health)."""
    fleet: FleetChannel | None = None
    experiments: ExperimentArms | None = None
    """The running experiment this server serves (follows `<lake.root>/experiments.json`)."""
    bronze_floor: Callable[[str], int] = lambda node: 0
    created_ms: int = 0  # before the catalogue and erasures were read from the lake

    def start(self) -> None:
        if self.metrics_enabled:  # first: a busy port fails before anything else started
            srv = self.settings.server
            ensure_free(srv.host, srv.metrics_port, "server.metrics_port")
            self.ports["metrics"] = self.metrics.serve(srv.host, srv.metrics_port,
                                                       ready=self._serving.is_set)
        self.ingest.start()
        foldin.warm_up()
        self.warm_start()
        if self.settings.fleet.redis_url:  # after the warm start: the replay builds on it
            self.fleet = FleetChannel(self.settings.fleet, self.ingest.node_id,
                                      ReplicaApplier(self.engine, self.ingest.inner))
            self.ingest.attach(self.fleet)
            self.engine.catalog.published = self.fleet.publish_items
            self.fleet.start(self.bronze_floor, self.created_ms)
        self.grpc_server.start()
        self.admin_server.start()
        for h in (self.health, self.admin_health):
            for name in ("", *service_names()):
                h.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._serving.set()
        if self.settings.server.reload_poll_s > 0:
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()
        if self.experiments is not None:
            self.experiments.start()
        log.info("server started", extra={"ports": self.ports,
                                          "model": getattr(self.manager.current, "version", None)})

    def warm_start(self) -> int:
        """Rebuild online state from the bronze events the model was not trained on.

        After a restart, users keep what they did since the last batch run (read-your-writes
        survives restarts), late arrivals included: the users who sent the latest events,
        up to the online caps, as the running server held them (`online.warm_start`), so
        the time it takes follows the caps, not how many ids sent events. Real-time
        popularity counts all of them. Skipped when the bundle does not say what it was
        trained on. Returns the events replayed into user state.
        """
        model = self.manager.current
        cut = model.cut if model is not None else None
        if not self.lake.exists("bronze_events"):
            return 0
        # One snapshot: the fleet channel replays a peer's events only past what it held.
        snapshot = self.lake.delta("bronze_events")
        self.bronze_floor = lambda node: int(
            snapshot.transaction_version(f"{APP_PREFIX}{node}") or 0)
        if model is None or cut is None:
            return 0
        t0 = time.perf_counter()
        ts_type = pa.timestamp("us", tz="UTC")
        newer = ds.field("ts") >= pa.scalar(cut.ts_before, ts_type)
        if cut.received_until is not None:  # late events live in old event dates
            newer = newer | (ds.field("received_at") > pa.scalar(cut.received_until, ts_type))
        else:
            newer = newer & (ds.field("event_date") >= pa.scalar(cut.ts_before.date()))
        table = self.lake.read(
            "bronze_events", version=snapshot.version(),
            columns=["user_id", "item_id", "event_type", "value", "ts", "received_at"],
            filters=newer)
        in_bronze = table.num_rows
        state = self.engine.state
        restore_popularity(state.popularity, table, state.params(model))
        # a user keeps up to their latest seen_items_per_user events for exclude-seen
        recent = latest_users(table, max_users=state.max_users,
                              per_user=max(state.recent_cap, state.seen_cap),
                              max_events=state.max_events)
        replay(state, model, recent)
        replayed = recent.num_rows
        del table, recent
        # Arrow's allocator keeps what the read and the selection used (hundreds of MB
        # after a day of junk ids) unless asked to give it back.
        pa.default_memory_pool().release_unused()
        log.info("warm start", extra={"events": replayed,
                                      "since": cut.ts_before.isoformat(),
                                      "bronze_events": in_bronze, "users": len(state),
                                      "seconds": round(time.perf_counter() - t0, 3)})
        return replayed

    def _poll(self) -> None:
        while not self._stop_poll.wait(self.settings.server.reload_poll_s):
            try:
                out = self.manager.poll_once()
                if out:
                    self.metrics.reloads.labels("ok").inc()
            except Exception:
                self.metrics.reloads.labels("refused").inc()
                log.exception("model poll reload failed; keeping the serving model")

    def reload(self, version: str | None) -> dict[str, Any]:
        try:
            out = self.manager.reload(version)
        except Exception:
            self.metrics.reloads.labels("refused").inc()
            raise
        self.metrics.reloads.labels("ok" if out["changed"] else "unchanged").inc()
        return out

    def stop(self, grace: float | None = 5.0) -> None:
        """Graceful: NOT_SERVING, still answering for `server.drain_s` (until health checks
        have taken it out of a front door), then finish in-flight RPCs (up to `grace` s),
        flush ingest."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stop_poll.set()
        if self.experiments is not None:
            self.experiments.close()
        self._serving.clear()
        self.health.enter_graceful_shutdown()
        self.admin_health.enter_graceful_shutdown()
        if self.settings.server.drain_s > 0:
            log.info("draining", extra={"seconds": self.settings.server.drain_s})
            time.sleep(self.settings.server.drain_s)
        a = self.grpc_server.stop(grace)
        b = self.admin_server.stop(grace)
        a.wait()
        b.wait()
        try:
            if self.fleet is not None:  # before the WAL closes: a peer's erasure needs it
                self.fleet.close()
            self.ingest.close()
        finally:
            self.metrics.close()
            log.info("server stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def oldest_cut(models: Sequence[LoadedModel], champion: LoadedModel) -> LoadedModel:
    """The held model trained on the least (the earliest training cut): what the online
    state may forget is what every held model learned. A model that does not record its
    cut learned nothing for sure: then the champion decides (as before experiments)."""
    cut_models = [m for m in models if m.cut is not None]
    if champion.cut is None or len(cut_models) < len(models):
        return champion
    return min(cut_models, key=lambda m: m.cut.ts_before if m.cut is not None else 0)


def _make_grpc_server(settings: Settings, workers: int, interceptor: ServiceInterceptor) -> Any:
    mb = settings.server.max_message_bytes
    favour_requests(settings.server)  # process-wide: the GIL hand-over and the collector
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", mb),
            ("grpc.max_send_message_length", mb),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=workers * 64,
    )


def create_server(
    settings: Settings,
    *,
    lake: Lake | None = None,
    ingest: Any = None,
    load_model: bool = True,
    metrics: bool = True,
    threads: bool = True,
) -> tuple[OnlineServer, dict[str, int]]:
    """Build (not start) the server. Returns it and its bound ports {grpc, admin}.

    Args:
        settings: full settings; `server.port` / `admin_port` 0 bind free ports.
        lake: the lake to read the catalogue from and ingest into (default: settings').
        ingest: an `online.ingest.IngestPipeline`-compatible object (default: a real one).
        load_model: load the CURRENT model now (a missing CURRENT is not an error: the
            server answers from popularity until a model is loaded).
        metrics: start the Prometheus endpoint on `server.metrics_port` at start().
        threads: set FAISS/BLAS to one thread in this process.
    """
    srv = settings.server
    created_ms = int(time.time() * 1000)
    # Before anything is built or written: a busy port is one clear line, not a traceback.
    for setting, port in (("server.port", srv.port), ("server.admin_port", srv.admin_port)):
        ensure_free(srv.host, port, setting)
    guard = public_guard(settings)  # a server that must not start says so before any work
    admin_check = admin_guard(srv)
    tls = server_credentials(srv)
    if threads:
        limit_threads()
    lake = lake or Lake.from_settings(settings.lake)
    if ingest is None:
        ingest = IngestPipeline(settings, lake)
    if settings.fleet.redis_url:
        ingest = PublishingIngest(ingest)
    m = Metrics()
    if hasattr(ingest, "stats"):
        m.watch_ingest(ingest.stats)
    state = OnlineState(settings)
    catalog = Catalog(lake)
    catalog.load()

    def prepare(new: LoadedModel) -> None:
        # Erased users stay hidden in every model trained before their erasure, across
        # restarts and on servers that did not receive the ForgetUser call.
        new.forgotten |= erased_users(lake, trained_from(new.bundle.manifest))
        catalog.rows(new)  # the filters' row arrays, built before the model serves

    def refold(new: LoadedModel, old: LoadedModel | None) -> int:
        prepare(new)
        return state.refold(new)

    def swapped(new: LoadedModel) -> None:
        # Only now: until the swap the old model still needs every event. An experiment's
        # model trained on less than the champion keeps what it has not learned.
        state.trim(oldest_cut(manager.models(), new))
        m.set_model(new.version)
        m.online_items.set(new.online_items)

    manager = ModelManager(settings, on_new_model=refold, on_swapped=swapped,
                           on_held=prepare)
    if load_model and current_version(settings.model.dir):
        manager.reload(None)
    engine = Recommender(settings, manager, state, catalog)
    arms = ExperimentArms(ExperimentStore(experiments_file(settings)), manager)
    if load_model:  # a restart serves the running experiment from its first request
        arms.refresh()

    public_health = health.HealthServicer()
    admin_health = health.HealthServicer()
    undecodable_log = EveryInterval(UNDECODABLE_LOG_INTERVAL_S)
    limits = RateLimits.from_settings(srv)  # per key: calls/s here, events/s in IngestEvents
    public = _make_grpc_server(settings, srv.workers,
                               ServiceInterceptor(m, guard=guard, limits=limits,
                                                  undecodable_log=undecodable_log))
    admin = _make_grpc_server(settings, 2, ServiceInterceptor(
        m, guard=admin_check, undecodable_log=undecodable_log))
    server = OnlineServer(settings, public, admin, public_health, admin_health, manager,
                          engine, ingest, m, lake, metrics_enabled=metrics,
                          created_ms=created_ms, experiments=arms,
                          public_key=guard.internal_key if guard is not None else None)

    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(settings, engine, ingest, m, limits=limits, experiments=arms),
        public)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(engine, state, ingest, m, Validator(settings), server.reload,
                      experiments=arms), admin)
    names = service_names()
    for g, h, svc in ((public, public_health, names[0]), (admin, admin_health, names[1])):
        health_pb2_grpc.add_HealthServicer_to_server(h, g)
        for name in ("", svc):
            h.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # SERVING at start()
        reflection.enable_server_reflection(
            (svc, health.SERVICE_NAME, reflection.SERVICE_NAME), g)
    ports = {name: (g.add_secure_port(addr, tls) if tls is not None else
                    g.add_insecure_port(addr))
             for name, g, addr in (("grpc", public, f"{srv.host}:{srv.port}"),
                                   ("admin", admin, f"{srv.host}:{srv.admin_port}"))}
    if 0 in ports.values():
        raise OSError(f"cannot bind {srv.host}: ports {ports}")
    server.ports = ports
    return server, ports


def serve(settings: Settings) -> None:
    """Run the server until SIGINT/SIGTERM, then shut down gracefully."""
    configure_logging()
    server, ports = create_server(settings)
    server.start()
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal received, shutting down", extra={"signal": signum})
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    done.wait()
    server.stop(grace=settings.server.flush_interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m online.server",
        description="Serve the online layer (Recommender + Admin gRPC services, Prometheus "
                    "metrics) from the configuration (`python -m lake.config`) until SIGINT "
                    "or SIGTERM. `make run` also loads sample data, trains a first model and "
                    "serves the web console.")
    p.parse_args(argv)
    try:
        serve(load_settings())
    except (ConfigError, PortInUse, NodeIdentityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
