"""What the console shows, read from a running server: its gRPC API (so answers are exactly
what a shop backend gets), its online state, the lake and its metrics registry."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from lambdarec_client import Client, to_dict

from lake.as_of import event_date_bounds
from lake.bundle import current_version
from lake.tls import own_client_tls

RECENT_EVENTS = 20
TRIAL_MARK = ".t"
"""Tuning trials are `model_runs` rows versioned `<version>.tNN`."""


@dataclass
class Sample:
    """Cumulative counters at one instant; the browser turns two samples into rates."""

    ts: float
    requests: float
    errors: float
    latency_sum: float
    latency_count: float
    ingest_lag_s: float = 0.0
    pending_events: float = 0.0


class ConsoleData:
    """Reads for the pages; writes (ingest, reload, rollback, forget) go through the API."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.settings = server.settings
        host = self.settings.server.host
        self.client = Client(f"{host}:{server.ports['grpc']}", f"{host}:{server.ports['admin']}",
                             token=self.settings.server.admin_token, key=server.public_key,
                             timeout=10.0, **own_client_tls(self.settings.server))

    def close(self) -> None:
        self.client.close()

    # -- items and users -------------------------------------------------------------------
    def item(self, item_id: str) -> dict[str, Any]:
        info = self.server.engine.catalog.get(item_id)
        return {"item_id": item_id, "title": info.title, "category": info.category,
                "price": info.price, "available": info.available}

    def with_items(self, reply: dict[str, Any]) -> dict[str, Any]:
        """A Recommend/SimilarItems reply with each item's (and each reason's) catalogue row."""
        for it in reply.get("items", []):
            it.update({k: v for k, v in self.item(it["item_id"]).items() if k != "item_id"})
            it["because"] = [self.item(b) for b in it.get("because", [])]
        return reply

    def recommend(self, user_id: str, k: int = 10) -> dict[str, Any]:
        return self.with_items(to_dict(self.client.recommend(user_id, k, explain=True)))

    def similar(self, item_id: str, k: int = 10) -> dict[str, Any]:
        return self.with_items(to_dict(self.client.similar(item_id, k)))

    def ingest(self, user_id: str, item_id: str, event_type: str) -> dict[str, Any]:
        return to_dict(self.client.ingest(
            [{"user_id": user_id, "item_id": item_id, "event_type": event_type,
              "properties": {"source": "console"}}]))

    def recent_events(self, user_id: str) -> list[dict[str, Any]]:
        """The user's latest events, each once: the lake's, and the real-time ones the server
        holds that the lake does not have yet ("where" says which)."""
        rows: list[dict[str, Any]] = []
        lake = self.server.lake
        in_lake: set[tuple[Any, str, str]] = set()
        if lake.exists("bronze_events"):
            t = lake.read("bronze_events", columns=["user_id", "item_id", "event_type", "value",
                                                    "ts"],
                          filters=pc.field("user_id") == user_id)
            for r in t.sort_by([("ts", "descending")]).slice(0, RECENT_EVENTS).to_pylist():
                rows.append({**r, "where": "lake"})
                in_lake.add((r["ts"], r["item_id"], r["event_type"]))
        # An event flushed to bronze is also still in the real-time state: show it once.
        for e in self.server.engine.state.recent_events(user_id):
            if (e.ts, e.item_id, e.event_type) in in_lake:
                continue
            rows.append({"ts": e.ts, "item_id": e.item_id, "event_type": e.event_type,
                         "value": None if math.isnan(e.value) else e.value,
                         "where": "real time"})
        rows.sort(key=lambda r: r["ts"], reverse=True)
        for r in rows:
            r.update({k: v for k, v in self.item(r["item_id"]).items()
                      if k in ("title", "category")})
        return rows[:RECENT_EVENTS]

    # -- models ----------------------------------------------------------------------------
    def model_runs(self) -> tuple[list[dict[str, Any]], str | None]:
        """Training runs (newest first, trials apart) and the version CURRENT names."""
        lake = self.server.lake
        rows = lake.read("model_runs").to_pylist() if lake.exists("model_runs") else []
        runs = [_decode(r) for r in rows if TRIAL_MARK not in r["model_version"]]
        runs.sort(key=lambda r: r["created_at"], reverse=True)
        return runs, current_version(self.settings.model.dir)

    def model_run(self, version: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """One run and its tuning trials (in trial order)."""
        lake = self.server.lake
        if not lake.exists("model_runs"):
            return None, []
        rows = lake.read("model_runs").to_pylist()
        run = next((_decode(r) for r in rows if r["model_version"] == version), None)
        trials = sorted((_decode(r) for r in rows
                         if r["model_version"].startswith(version + TRIAL_MARK)),
                        key=lambda r: r["model_version"])
        return run, trials

    def report_dir(self, version: str) -> Path:
        return Path(self.settings.model.dir) / "reports" / version

    def plots(self, version: str) -> list[str]:
        d = self.report_dir(version)
        return sorted(p.name for p in d.glob("*.png")) if d.is_dir() else []

    def rollback(self, version: str | None) -> str:
        """Point CURRENT at `version` (default: the previous one) and serve it here."""
        from lake import rollback

        out = rollback.run(self.settings, version=version)
        reply = self.client.reload(out["version"])
        return f"CURRENT is {out['version']}; this server serves {reply.model_version}"

    def active_users(self, n: int) -> list[str]:
        """Users with the most events in the latest event date (links on the home page)."""
        lake = self.server.lake
        # The latest date from the Delta log's partition values: reading the event_date
        # column would scan all of bronze on every home-page view.
        bounds = event_date_bounds(lake)
        if bounds is None:
            return []
        t = lake.read("bronze_events", columns=["user_id"],
                      filters=pc.field("event_date") == bounds[1])
        counts = t.group_by("user_id").aggregate([("user_id", "count")])
        counts = counts.sort_by([("user_id_count", "descending"), ("user_id", "ascending")])
        return counts.column("user_id").slice(0, n).to_pylist()

    def serving(self) -> str | None:
        model = self.server.manager.current
        return model.version if model is not None else None

    # -- experiments -----------------------------------------------------------------------
    def experiments(self) -> list[dict[str, Any]]:
        """Every experiment (newest first), through the Admin API."""
        return [_experiment(e) for e in to_dict(self.client.list_experiments())
                .get("experiments", [])]

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        """One experiment; LookupError when there is none of that id."""
        import grpc

        try:
            return _experiment(to_dict(self.client.get_experiment(experiment_id)))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LookupError(f"no experiment {experiment_id!r}") from None
            raise

    def stop_experiment(self, experiment_id: str) -> str:
        e = to_dict(self.client.stop_experiment(experiment_id))
        return f"experiment {e['experiment_id']} is {e['state']}"

    def experiment_results(self, experiment_id: str) -> list[dict[str, Any]]:
        """EXPERIMENT RESULTS (the attribution helper fills this in): the
        `experiment_results` rows of `experiment_id` (one per arm and metric, as
        `spark_jobs.experiment_analysis` writes them); [] while the table does not exist."""
        lake = self.server.lake
        if not lake.exists("experiment_results"):
            return []
        table = lake.read("experiment_results",
                          filters=pc.field("experiment_id") == experiment_id)
        return table.to_pylist()

    # -- live ------------------------------------------------------------------------------
    def sample(self) -> Sample:
        """Cumulative request, latency and ingest figures from the metrics registry."""
        requests = errors = lat_sum = lat_count = 0.0
        lag = pending = 0.0
        for metric in self.server.metrics.registry.collect():
            for s in metric.samples:
                if s.name == "grpc_server_handled_total":
                    requests += s.value
                    if s.labels.get("grpc_code") != "OK":
                        errors += s.value
                elif s.name == "grpc_server_handling_seconds_sum":
                    lat_sum += s.value
                elif s.name == "grpc_server_handling_seconds_count":
                    lat_count += s.value
                elif s.name == "lambdarec_ingest_flush_lag_seconds":
                    lag = s.value
                elif s.name == "lambdarec_ingest_pending_events":
                    pending = s.value
        return Sample(time.time(), requests, errors, lat_sum, lat_count, lag, pending)


def _experiment(e: dict[str, Any]) -> dict[str, Any]:
    """An Experiment message as a dict (`to_dict`) with the fields a page shows."""
    out = dict(e)
    out["stopped_at"] = e.get("stopped_at") or ""
    out["arms"] = [{"model_version": "", "popularity": False, "settings": {}, **a}
                   for a in e.get("arms", [])]
    return out


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("params", "metrics"):
        try:
            out[key] = json.loads(row.get(key) or "{}")
        except ValueError:
            out[key] = {}
    return out
