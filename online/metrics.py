"""Observability: Prometheus metrics (own registry per server) and JSON logs."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily

HEALTH_PATH = "/healthz"
"""The HTTP readiness path next to /metrics: 200 while the server serves, 503 otherwise."""
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LAG_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400)


def rpc_labels(full_method: str) -> tuple[str, str, str]:
    """`/pkg.Service/Method` as (grpc_type, grpc_service, grpc_method) label values."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return "unary", service, method


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No access log: scrapes and health checks (every 250 ms behind the fleet's front
        door) would flood stderr."""


class Metrics:
    """All online-layer metrics, registered on a private registry (several servers can
    live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The names and labels of the usual gRPC server metrics (go-grpc-prometheus,
        # py-grpc-prometheus), so standard dashboards and alerts work unchanged.
        self.requests = Counter("grpc_server_handled_total", "RPCs completed on the server",
                                ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
                                registry=r)
        self.latency = Histogram("grpc_server_handling_seconds",
                                 "Handling time of RPCs completed on the server",
                                 ["grpc_type", "grpc_service", "grpc_method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory...
        self.strategy = Counter("lambdarec_recommend_strategy_total",
                                "Recommend answers by strategy", ["strategy"], registry=r)
        self.events = Counter("lambdarec_events_total", "Ingested events by outcome",
                              ["outcome"], registry=r)
        self.ingest_lag = Histogram("lambdarec_ingest_lag_seconds",
                                    "Event time to fold-in (now - event ts)",
                                    buckets=_LAG_BUCKETS, registry=r)
        self.model_info = Gauge("lambdarec_model_info", "Serving model version (value 1)",
                                ["version"], registry=r)
        self.model_loaded = Gauge("lambdarec_model_loaded_timestamp_seconds",
                                  "When the serving model was swapped in", registry=r)
        self.reloads = Counter("lambdarec_model_reloads_total", "Model reload attempts",
                               ["outcome"], registry=r)
        self.online_users = Gauge("lambdarec_online_users", "Users with real-time state",
                                  registry=r)
        self.online_items = Gauge("lambdarec_online_items",
                                  "Items folded in online and added to the index", registry=r)
        self.ingest_pending = Gauge("lambdarec_ingest_pending_events",
                                    "Durable events not yet flushed to bronze", registry=r)
        self.ingest_flush_lag = Gauge("lambdarec_ingest_flush_lag_seconds",
                                      "Age of the oldest event waiting for the bronze flush",
                                      registry=r)
        # Every answer (Recommend, each RecommendBatch entry, SimilarItems) is an impression
        # with a recommendation_id, counted here whether or not sampling records it.
        self.impressions = Counter(
            "lambdarec_impressions_total",
            "Answers served (impressions), by serving model, strategy, experiment and arm",
            ["model_version", "strategy", "experiment", "arm"], registry=r)
        self.impressions_pending = Gauge(
            "lambdarec_impressions_pending",
            "Recorded impressions not yet in bronze_impressions (in memory or the WAL)",
            registry=r)
        self._impression_stats: Callable[[], dict[str, Any]] | None = None
        r.register(_ImpressionsDropped(lambda: self._impression_stats))
        self._version: str | None = None
        self._http: Any = None
        # Label children by label values: `labels()` takes a lock and builds a key per
        # call, which on the request path costs more than the increment itself.
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached (the children of a metric never change)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def watch_ingest(self, stats: Any) -> None:
        """Read the ingest pipeline's `stats()` at scrape time."""
        self.ingest_pending.set_function(lambda: float(stats().get("pending_events", 0)))
        self.ingest_flush_lag.set_function(lambda: float(stats().get("ingest_lag_s", 0.0)))
        self.impressions_pending.set_function(lambda: float(
            stats().get("impressions_waiting", 0) + stats().get("impressions_pending", 0)))
        self._impression_stats = stats

    def impression_counter(self, model_version: str, strategy: str, experiment: str,
                           arm: str) -> Any:
        """The `lambdarec_impressions_total` child of these labels (cached)."""
        return self.child(self.impressions, model_version, strategy, experiment, arm)

    def observe_rpc(self, rpc: tuple[str, str, str], code: str, seconds: float) -> None:
        self.child(self.requests, *rpc, code).inc()
        self.child(self.latency, *rpc).observe(seconds)

    def set_model(self, version: str) -> None:
        if self._version is not None:
            self.model_info.remove(self._version)
        self.model_info.labels(version).set(1)
        self._version = version
        self.model_loaded.set(time.time())

    def serve(self, host: str, port: int, ready: Callable[[], bool] = lambda: True) -> int:
        """Expose /metrics and `HEALTH_PATH` over HTTP; returns the bound port (port 0 picks
        one).

        `HEALTH_PATH` answers 200 `SERVING` while `ready()` holds, else 503 `NOT_SERVING`:
        the gRPC health status in a form an HTTP health check (HAProxy's, a cloud load
        balancer's) reads, so a front door stops sending calls to a replica that is
        starting or draining while its gRPC port still accepts connections."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != HEALTH_PATH:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            ok = ready()
            body = b"SERVING\n" if ok else b"NOT_SERVING\n"
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]

        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ImpressionsDropped:
    """`lambdarec_impressions_dropped_total`, read from the ingest pipeline's stats at
    scrape time (the recorder counts; a collector spares it a metrics dependency)."""

    def __init__(self, source: Callable[[], Callable[[], dict[str, Any]] | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[Any]:
        stats = self._source()
        value = float(stats().get("impressions_dropped", 0)) if stats is not None else 0.0
        yield CounterMetricFamily(
            "lambdarec_impressions_dropped",
            "Sampled impressions never recorded (memory buffer full, lake flush behind, "
            "WAL failure); the answers were served", value=value)


_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every `extra={...}` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: int | str = logging.INFO) -> None:
    """Route the root logger to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # faiss' loader logs every instruction set it probes at INFO (8 lines per start).
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
