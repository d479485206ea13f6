"""`make run`: bring the whole system up on this machine with the embedded defaults.

1. load the sample data into the lake (skipped when bronze already has events, or when
   `data.source` is `none`: start on an empty lake and fill it through the API),
2. run the batch pipeline once if no model is CURRENT yet (and the lake has events),
3. start the gRPC server (public + admin + metrics) and the web console, and print how to
   call them with ids that exist,
4. on Ctrl-C / SIGTERM shut down gracefully (NOT_SERVING, drain, flush the WAL).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from lake.bundle import current_version  # noqa: E402
from lake.config import ENV_PREFIX, PROJECT_ROOT, ConfigError, Settings, load_settings  # noqa: E402
from lake.reload_notice import python_command  # noqa: E402
from lake.tables import Lake  # noqa: E402
from online.auth import refuse_weak_admin_token  # noqa: E402
from online.fleet import Fleet, FleetError  # noqa: E402
from online.keys import KeyStore, keys_file  # noqa: E402
from online.node_identity import NodeIdentityError  # noqa: E402
from online.ports import PortInUse, ensure_free  # noqa: E402

# Used when the lake is empty (data.source none): any ids are valid in an ingest.
NEW_USER, NEW_ITEM = "alice", "sku-1"


def prepare(settings: Settings, *, pipeline: bool = True) -> dict[str, Any]:
    """Sample data + a first model when there is none; returns what was done."""
    from lake.load import ensure_sample_data

    out: dict[str, Any] = {"data": ensure_sample_data(settings)}
    has_events = Lake.from_settings(settings.lake).count("bronze_events") > 0
    if pipeline and has_events and current_version(settings.model.dir) is None:
        print("no CURRENT model yet: running the batch pipeline once (progress below)...",
              flush=True)
        out["pipeline"] = run_pipeline_process(settings)
    out["model"] = current_version(settings.model.dir)
    return out


def run_pipeline_process(settings: Settings) -> dict[str, Any]:
    """`spark_jobs.pipeline` with exactly `settings`, in a process of its own: its Spark
    JVM (GBs) exits with it instead of living on next to the server. Returns the summary
    it prints (also when the gate refused the model: `ok` false)."""
    tree = settings.model_dump(mode="json")
    # the server starts after this and loads CURRENT itself: nobody to tell about it yet
    tree["airflow"]["reload_targets"] = []
    with tempfile.TemporaryDirectory(prefix="lambdarec-run-") as tmp:
        config = Path(tmp) / "settings.yaml"
        config.write_text(yaml.safe_dump(tree))
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env["LAMBDAREC_CONFIG"] = str(config)
        done = subprocess.run([sys.executable, "-m", "spark_jobs.pipeline"], cwd=PROJECT_ROOT,
                              env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"the batch pipeline failed (exit {done.returncode}); "
                           "its messages are above")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary




def example_ids(lake: Lake) -> tuple[str, str, str]:
    """(an active user, an item they have not touched, a popular item) from bronze, so the
    printed commands show real answers; made-up ids on an empty lake."""
    import pyarrow.compute as pc

    if lake.count("bronze_events") == 0:
        return NEW_USER, NEW_ITEM, NEW_ITEM
    events = lake.read("bronze_events", columns=["user_id", "item_id"])
    by_user = events.group_by("user_id").aggregate([("item_id", "count")])
    by_user = by_user.sort_by([("item_id_count", "descending"), ("user_id", "ascending")])
    user = by_user.column("user_id")[0].as_py()
    by_item = events.group_by("item_id").aggregate([("user_id", "count")])
    by_item = by_item.sort_by([("user_id_count", "descending"), ("item_id", "ascending")])
    popular = by_item.column("item_id")[0].as_py()
    touched = set(events.filter(pc.equal(events.column("user_id"), user))
                  .column("item_id").to_pylist())
    fresh = next((i for i in by_item.column("item_id").to_pylist() if i not in touched), popular)
    return user, fresh, popular


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("shutting down...", flush=True)


def _run_fleet(args: argparse.Namespace) -> int:
    """N replicas + HAProxy (+ Redis): the same preparation, then `online.fleet.Fleet`."""
    from online.metrics import configure_logging

    configure_logging()
    settings = load_settings()
    srv = settings.server
    for setting in ("port", "admin_port"):  # the front door's
        ensure_free(srv.host, getattr(srv, setting), f"server.{setting}")
    refuse_weak_admin_token(srv)  # the servers would refuse it, but only after `prepare`
    done = prepare(settings, pipeline=not args.no_pipeline)
    fleet = Fleet(settings, args.replicas)
    state = fleet.start()
    print(json.dumps({"model": done["model"], "fleet": state}), flush=True)
    ports = {"grpc": srv.port, "admin": srv.admin_port}
    print(usage(settings, ports, example_ids(Lake.from_settings(settings.lake))), flush=True)
    print(f"{args.replicas} replicas behind HAProxy; addresses and pids in "
          f"{settings.fleet.run_dir / 'fleet.json'}", flush=True)
    _wait_for_signal()
    fleet.stop()
    return 0


def usage(settings: Settings, ports: dict[str, int], ids: tuple[str, str, str]) -> str:
    srv = settings.server
    user, fresh, popular = ids
    g, a = f"{srv.host}:{ports['grpc']}", f"{srv.host}:{ports['admin']}"
    c = f"{python_command()} -m lambdarec_client --target {g} --admin-target {a}"
    grpcurl = "grpcurl -plaintext"
    if srv.tls_cert is not None:
        c += f" --tls-ca {srv.tls_cert}"
        grpcurl = f"grpcurl -cacert {srv.tls_cert}"
    lines = [
        f"lambdarec online layer: Recommender on {g}, Admin on {a} "
        f"(token from server.admin_token), metrics on http://{srv.host}:{ports['metrics']}/metrics"
        if "metrics" in ports else
        f"lambdarec online layer: Recommender on {g}, Admin on {a} "
        "(token from server.admin_token)",
    ]
    if "console" in ports:
        scheme = "https" if srv.tls_cert is not None else "http"  # the console's TLS too
        lines.append(f"console: {scheme}://{srv.host}:{ports['console']}/")
    if srv.auth == "keys" and KeyStore(keys_file(settings)).load():
        lines.append("public calls need an access key: export LAMBDAREC_KEY=<key> "
                     "(python -m online.keys create --name NAME --scopes recommend,ingest)")
    lines += [
        "try:",
        f"  {c} recommend {user} -k 10 --explain",
        f"  {c} ingest --user {user} --item {fresh} --type purchase",
        f"  {c} recommend {user} -k 5          # the purchase changes the answer at once",
        f"  {c} similar {popular} -k 5",
        f"  {c} model-info",
        f"  {grpcurl} {g} list      # reflection",
        "Ctrl-C stops the server gracefully.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-pipeline", action="store_true",
                   help="do not train a model when none is CURRENT (serve popularity)")
    p.add_argument("--no-console", action="store_true", help="do not serve the web console")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N > 1: N replicas behind an HAProxy front door on server.port "
                        "(online/fleet.py; no web console)")
    args = p.parse_args(argv)
    try:
        if args.replicas < 1:
            raise ConfigError(f"REPLICAS: must be at least 1, got {args.replicas}")
        return _run_fleet(args) if args.replicas > 1 else _run(args)
    except (ConfigError, PortInUse, NodeIdentityError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from online.metrics import configure_logging
    from online.server import create_server

    configure_logging()
    settings = load_settings()
    srv = settings.server
    # Before minutes of data loading and training: a busy port fails now, in one line.
    for setting in ("port", "admin_port", "metrics_port",
                    *(() if args.no_console else ("console_port",))):
        ensure_free(srv.host, getattr(srv, setting), f"server.{setting}")
    refuse_weak_admin_token(srv)  # the servers would refuse it, but only after `prepare`
    done = prepare(settings, pipeline=not args.no_pipeline)
    if done["model"] is None:
        reason = (done.get("pipeline") or {}).get("reason")
        print(f"warning: no model is CURRENT ({reason or 'pipeline skipped'}); the server "
              "answers from popularity until `make pipeline` publishes one",
              file=sys.stderr)
    server, ports = create_server(settings)
    console = None
    if not args.no_console:
        from online.console.app import create_console

        console = create_console(settings, server)
        ports["console"] = console.port
    server.start()
    if console is not None:
        console.start()
    print(json.dumps({"model": done["model"], "ports": ports}), flush=True)
    print(usage(settings, ports, example_ids(server.lake)), flush=True)

    _wait_for_signal()
    if console is not None:
        console.stop()
    server.stop(grace=settings.server.flush_interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
