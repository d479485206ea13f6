"""Junk ids: the online server's memory and restart time after a flood of made-up user ids,
through the real gRPC server on 127.0.0.1.

`python -m online.server` (from this checkout, or from `--tree`, e.g. an export of an older
commit, for a before/after comparison on the same box) serves the cached bench bundle of
`--items` items, re-published with a training cut in the past: every event sent is
real-time state, and a restart's warm start replays it from bronze. One run:

1. start on an empty bronze: start-up time (process start to SERVING) and RSS after a
   few Recommend calls -- the baseline;
2. send `--events` events, each from a new random user id on a real item, in
   IngestEvents batches of `--batch`, one call in flight (re-sent after the server's hint
   when it answers RESOURCE_EXHAUSTED or UNAVAILABLE); RSS at checkpoints;
3. graceful stop (the WAL flushes to bronze) and a count of bronze: every acknowledged
   event must be there;
4. restart on that lake and WAL: start-up time and RSS again.

    python -m bench.junk_ids [--events 1000000] [--items 20000] [--batch 1000]
                             [--checkpoint 300000] [--tree PATH] [--max-s 1800]

Every figure is printed as one JSON line, then a table next to the baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import CACHE_DIR, ensure_bundle, scratch_dir, thread_env, wait_serving
from bench.fixtures import write_catalog as write_bench_catalog
from lake.config import PROJECT_ROOT
from online.ports import free_port

INGEST = "/lambdarec.v1.Recommender/IngestEvents"
RECOMMEND = "/lambdarec.v1.Recommender/Recommend"
VERSION = "vjunk"
CUT = datetime(2020, 1, 1, tzinfo=UTC)
"""The bundle's training cut: every bench event is newer, so all of it is real-time state."""
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 300.0
RETRY_S = 0.2
"""Pause before re-sending a batch the server refused for now (no hint given)."""


def bundle_with_cut(n_items: int, n_users: int) -> Path:
    """The cached bench bundle re-published with `CUT` (cached too); returns its models dir."""
    from lake.bundle import read_bundle, set_current, write_bundle
    from lake.config import IndexSettings
    from lake.training_cut import TrainingCut
    from lake.vector_index import build_and_save

    bb, _ = ensure_bundle(n_items, n_users=n_users)
    models = CACHE_DIR / f"junk-bundle-i{n_items}-u{n_users}"
    if (models / VERSION / "manifest.json").exists():
        return models
    shutil.rmtree(models, ignore_errors=True)
    b = read_bundle(bb.bundle_dir)
    write_bundle(models, VERSION, user_ids=b.user_ids, item_ids=b.item_ids,
                 user_factors=b.user_factors, item_factors=b.item_factors,
                 user_items=b.user_items, item_popularity=b.item_popularity,
                 foldin=b.manifest.foldin, backend=b.manifest.backend,
                 params=dict(b.manifest.params), cut=TrainingCut(CUT),
                 write_index=lambda f, p: build_and_save(f, p, IndexSettings()))
    set_current(models, VERSION)
    return models


def server_fields(tree: Path) -> set[str]:
    """The `server.*` settings the checkout at `tree` knows (an older one knows fewer)."""
    out = subprocess.run(
        [sys.executable, "-c", "from lake.config import ServerSettings; "
         "print(' '.join(ServerSettings.model_fields))"],
        cwd=tree, env=thread_env({"PYTHONPATH": str(tree)}), capture_output=True, text=True,
        check=True, timeout=60)
    return set(out.stdout.split())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str
    log_path: Path
    startup_s: float

    def stop(self) -> float:
        """Graceful stop (SIGTERM: the WAL flushes to bronze); returns the seconds it took."""
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not stop within {STOP_TIMEOUT_S:.0f} s") from None
        return time.perf_counter() - t

    def warm_start(self) -> dict[str, Any]:
        """The server's "warm start" log line (events replayed, users), if it logged one."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if "warm start" in line:
                try:
                    return {k: v for k, v in json.loads(line).items()
                            if k in ("events", "users", "bronze_events", "seconds")}
                except ValueError:
                    return {"line": line[-300:]}
        return {}


def start_server(tree: Path, work: Path, models: Path, env_extra: dict[str, str],
                 name: str) -> Server:
    port, admin = free_port(), free_port()
    env = thread_env({
        "PYTHONPATH": str(tree),
        "LAMBDAREC__LAKE__ROOT": str(work / "lake"),
        "LAMBDAREC__MODEL__DIR": str(models),
        "LAMBDAREC__SERVER__WAL_DIR": str(work / "wal"),
        "LAMBDAREC__SERVER__HOST": "127.0.0.1",
        "LAMBDAREC__SERVER__PORT": str(port),
        "LAMBDAREC__SERVER__ADMIN_PORT": str(admin),
        "LAMBDAREC__SERVER__METRICS_PORT": "0",
        "LAMBDAREC__SERVER__RELOAD_POLL_S": "0",
        **env_extra,
    })
    log_path = work / f"{name}.log"
    t0 = time.perf_counter()
    with log_path.open("wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "online.server"], cwd=tree, env=env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, proc, STARTUP_TIMEOUT_S, log_path)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(proc, target, log_path, time.perf_counter() - t0)


def recommend_probe(target: str, n_users: int, calls: int = 200) -> float:
    """`calls` Recommend calls for known users (warms the server up); returns p50 ms."""
    import grpc

    from online.pb import recommender_pb2 as pb

    lat = []
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(RECOMMEND)
        for i in range(calls):
            req = pb.RecommendRequest(user_id=f"u{(i * 7919) % n_users}", k=10)
            t = time.perf_counter()
            call(req.SerializeToString(), timeout=10)
            lat.append(time.perf_counter() - t)
    return float(np.percentile(np.array(lat) * 1000, 50))


def junk_payloads(n_events: int, batch: int, n_items: int) -> list[bytes]:
    """IngestEventsRequest bytes: every event from a new random user id, on a real item."""
    from lambdarec_client import make_event

    from online.pb import recommender_pb2 as pb

    rng = np.random.default_rng(17)
    items = rng.integers(0, n_items, n_events)
    now = datetime.now(UTC)
    out = []
    for start in range(0, n_events, batch):
        end = min(n_events, start + batch)
        out.append(pb.IngestEventsRequest(events=[make_event({
            "event_id": f"junk-{i}", "user_id": f"junk-{uuid.uuid4().hex}",
            "item_id": f"i{items[i]}", "event_type": "view", "ts": now})
            for i in range(start, end)]).SerializeToString())
    return out


def send(target: str, payloads: Sequence[bytes], deadline: float) -> tuple[int, float]:
    """Send every payload (one call in flight), re-sending those refused for now; returns
    (events acknowledged, seconds)."""
    import grpc

    from online.pb import recommender_pb2 as pb

    acked = 0
    t0 = time.perf_counter()
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(INGEST)
        for payload in payloads:
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError("time budget (--max-s) spent while sending")
                try:
                    reply = pb.IngestEventsResponse.FromString(call(payload, timeout=60))
                    acked += reply.accepted + reply.duplicates
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          grpc.StatusCode.UNAVAILABLE):
                        raise
                    hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                    time.sleep(int(hint) / 1000 if hint else RETRY_S)
    return acked, time.perf_counter() - t0


def run(*, events: int, items: int, users: int, batch: int, checkpoint: int, tree: Path,
        max_s: float) -> dict[str, Any]:
    from lake.tables import Lake

    deadline = time.monotonic() + max_s
    models = bundle_with_cut(items, users)
    known = server_fields(tree)
    # Bench the memory and the replay, not the limits: no per-key rate limit where the
    # checkout has them.
    env_extra = {f"LAMBDAREC__SERVER__{k.upper()}": "0"
                 for k in ("rate_limit_events_per_s", "rate_limit_calls_per_s") if k in known}
    print(f"[junk] building {events:,} events", file=sys.stderr, flush=True)
    payloads = junk_payloads(events, batch, items)
    work = scratch_dir("junk-ids-")
    figures: dict[str, Any] = {"tree": str(tree), "events": events, "items": items,
                               "batch": batch}
    try:
        write_bench_catalog(work / "lake", np.zeros(items, dtype=np.int64))
        srv = start_server(tree, work, models, env_extra, "first")
        try:
            recommend_probe(srv.target, users)
            figures["baseline"] = {"startup_s": srv.startup_s, "rss_mb": rss_mb(srv.proc.pid)}
            print(json.dumps({"baseline": figures["baseline"]}), flush=True)
            sent, per_call = 0, max(1, checkpoint // batch)
            figures["checkpoints"] = []
            acked_total, send_s = 0, 0.0
            for start in range(0, len(payloads), per_call):
                acked, took = send(srv.target, payloads[start:start + per_call], deadline)
                acked_total += acked
                send_s += took
                sent = min(events, (start + per_call) * batch)
                point = {"events": sent, "rss_mb": rss_mb(srv.proc.pid),
                         "events_per_s": acked / took if took else 0.0}
                figures["checkpoints"].append(point)
                print(json.dumps({"after": point}), flush=True)
            recommend_probe(srv.target, users)
            figures["after"] = {"events": acked_total, "rss_mb": rss_mb(srv.proc.pid),
                                "events_per_s": acked_total / send_s if send_s else 0.0}
        finally:
            figures["stop_s"] = srv.stop()
        bronze = Lake(work / "lake").count("bronze_events")
        figures["acked"], figures["bronze"] = acked_total, bronze
        print(json.dumps({"acked": acked_total, "bronze": bronze,
                          "stop_s": figures["stop_s"]}), flush=True)
        srv = start_server(tree, work, models, env_extra, "restart")
        try:
            figures["restart"] = {"startup_s": srv.startup_s, "rss_mb": rss_mb(srv.proc.pid),
                                  "warm_start": srv.warm_start()}
            recommend_probe(srv.target, users)
            figures["restart"]["rss_after_probe_mb"] = rss_mb(srv.proc.pid)
            print(json.dumps({"restart": figures["restart"]}), flush=True)
        finally:
            srv.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def table(f: dict[str, Any]) -> str:
    rows = [f"junk ids: {f['events']:,} events from new user ids, {f['items']:,} items, "
            f"server from {f['tree']}",
            f"{'':28s}{'baseline':>12s}" + "".join(f"{'after ' + format(p['events'], ','):>16s}"
                                                 for p in f["checkpoints"]) + f"{'restart':>12s}",
            f"{'RSS MB':28s}{f['baseline']['rss_mb']:12.0f}"
            + "".join(f"{p['rss_mb']:16.0f}" for p in f["checkpoints"])
            + f"{f['restart']['rss_mb']:12.0f}",
            f"{'start-up s (to SERVING)':28s}{f['baseline']['startup_s']:12.1f}"
            + " " * 16 * len(f["checkpoints"]) + f"{f['restart']['startup_s']:12.1f}",
            f"{'ingest events/s':28s}{'':12s}"
            + "".join(f"{p['events_per_s']:16.0f}" for p in f["checkpoints"]),
            f"acknowledged {f['acked']:,}, in bronze after the stop {f['bronze']:,}; "
            f"graceful stop {f['stop_s']:.1f} s; warm start {f['restart']['warm_start']}"]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.junk_ids", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=20_000, help="users of the bench bundle")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--checkpoint", type=int, default=300_000,
                   help="measure RSS every this many events")
    p.add_argument("--tree", type=Path, default=PROJECT_ROOT,
                   help="checkout whose online.server runs (default: this one)")
    p.add_argument("--max-s", type=float, default=1800.0, help="time budget of the run")
    a = p.parse_args(argv)
    figures = run(events=a.events, items=a.items, users=a.users, batch=a.batch,
                  checkpoint=a.checkpoint, tree=a.tree.resolve(), max_s=a.max_s)
    print(json.dumps(figures))
    print(table(figures))
    return 0 if figures["acked"] == figures["bronze"] else 1


if __name__ == "__main__":
    sys.exit(main())
