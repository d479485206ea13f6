"""`make run`: bring the whole system up on this machine with the embedded defaults.

1. load the sample data into the lake (skipped when bronze already has events),
2. run the batch pipeline once if no model is CURRENT yet,
3. start the gRPC server (public + admin + metrics) and print how to call it,
4. on Ctrl-C / SIGTERM shut down gracefully (NOT_SERVING, drain, flush the WAL).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
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
from lake.config import ENV_PREFIX, PROJECT_ROOT, Settings, load_settings  # noqa: E402

log = logging.getLogger("online.run")


def prepare(settings: Settings, *, pipeline: bool = True) -> dict[str, Any]:
    """Sample data + a first model when there is none; returns what was done."""
    from lake.load import ensure_sample_data

    out: dict[str, Any] = {"data": ensure_sample_data(settings)}
    if pipeline and current_version(settings.model.dir) is None:
        print("no CURRENT model yet: running the batch pipeline once (a few minutes)...",
              flush=True)
        out["pipeline"] = run_pipeline_process(settings)
    out["model"] = current_version(settings.model.dir)
    return out


def run_pipeline_process(settings: Settings) -> dict[str, Any]:
    """`spark_jobs.pipeline` with exactly `settings`, in a process of its own: its Spark
    JVM (GBs) exits with it instead of living on next to the server. Returns the summary
    it prints (also when the gate refused the model: `ok` false)."""
    with tempfile.TemporaryDirectory(prefix="lambdarec-run-") as tmp:
        config = Path(tmp) / "settings.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
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


def usage(settings: Settings, ports: dict[str, int]) -> str:
    srv = settings.server
    g, a = f"{srv.host}:{ports['grpc']}", f"{srv.host}:{ports['admin']}"
    c = f"python -m lambdarec_client --target {g} --admin-target {a}"
    return "\n".join([
        f"lambdarec online layer: Recommender on {g}, Admin on {a} "
        f"(token from server.admin_token), metrics on http://{srv.host}:{ports.get('metrics')}/metrics",
        "try:",
        f"  {c} recommend <user_id> -k 10 --explain",
        f"  {c} ingest --user someone --item <item_id> --type purchase",
        f"  {c} recommend someone -k 5",
        f"  {c} similar <item_id> -k 5",
        f"  {c} model-info",
        f"  grpcurl -plaintext {g} list      # reflection",
        "Ctrl-C stops the server gracefully.",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-pipeline", action="store_true",
                   help="do not train a model when none is CURRENT (serve popularity)")
    args = p.parse_args(argv)

    from online.metrics import configure_logging
    from online.server import create_server

    configure_logging()
    settings = load_settings()
    done = prepare(settings, pipeline=not args.no_pipeline)
    if done["model"] is None:
        reason = (done.get("pipeline") or {}).get("reason")
        print(f"warning: no model is CURRENT ({reason or 'pipeline skipped'}); the server "
              "answers from popularity until `make pipeline` publishes one and it is reloaded",
              file=sys.stderr)
    server, ports = create_server(settings)
    server.start()
    print(json.dumps({"model": done["model"], "ports": ports}), flush=True)
    print(usage(settings, ports), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("shutting down...", flush=True)
    server.stop(grace=settings.server.flush_interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
