"""Fairness under an ingest flood: a known user's Recommend latency while other tenants
flood IngestEvents, through the real gRPC server on 127.0.0.1.

`python -m online.server` runs as a subprocess with access keys: one per flood client
(`flood-0`, ...: ingest; `one-key`: a single `flood` key for all of them) and one for the
probe (`shop`: recommend). Per configuration, on a fresh server:

1. the probe (a thread of this process, which otherwise only waits) calls Recommend for a
   known user at a fixed rate; its first `before_s` seconds, with no flood, are "before";
2. `clients` flood processes (`python -m bench.flood client`, each with its own GIL) each
   send `batches` IngestEvents batches of `batch` events, one call in flight, as fast as
   the server takes them. A batch answered RESOURCE_EXHAUSTED is re-sent after the
   server's hint (trailing `retry-after-ms`), one answered UNAVAILABLE (bronze flush far
   behind) after UNAVAILABLE_BACKOFF_S, so every event is acknowledged in the end (within
   `max_flood_s`). The probe's calls while any flood client runs are "during".

Configurations, same run, same code: `unprotected` (rate limits, the ingest bound, the GIL
switch interval and the GC threshold off: the behaviour before they existed), `bounded`
(all but the rate limits: the whole flood is taken as fast as the server can),
`defaults` (shipped settings, one key per client), `one-key` (shipped settings, the
clients share one key: its events/s limit binds).

    python -m bench.flood [--quick] [--configs unprotected,bounded,defaults,one-key]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import ensure_bundle, percentiles, running_server, scratch_dir, thread_env
from bench.report import Report
from lake.config import PROJECT_ROOT

INGEST = "/lambdarec.v1.Recommender/IngestEvents"
RECOMMEND = "/lambdarec.v1.Recommender/Recommend"
PROBE_USER = "u0"
TARGET_P99_MS = 20.0
UNAVAILABLE_BACKOFF_S = 0.5
CONFIGS: dict[str, dict[str, str]] = {
    "unprotected": {"RATE_LIMIT_EVENTS_PER_S": "0", "RATE_LIMIT_CALLS_PER_S": "0",
                    "INGEST_CONCURRENCY": "0", "SWITCH_INTERVAL_MS": "0",
                    "GC_FULL_THRESHOLD": "0"},
    "bounded": {"RATE_LIMIT_EVENTS_PER_S": "0", "RATE_LIMIT_CALLS_PER_S": "0"},
    "defaults": {},
    "one-key": {},
}
"""Server settings per configuration (`LAMBDAREC__SERVER__<KEY>` overrides)."""
SHARED_KEY = {"one-key"}
"""Configurations whose flood clients share one access key (one rate budget)."""


def flood_event_ids(client: int, b: int, batch: int) -> list[str]:
    """The event ids of batch `b` of flood client `client`."""
    return [f"flood{client}-{b}-{i}" for i in range(batch)]


def flood_payloads(client: int, *, batches: int, batch: int, users: Sequence[str],
                   items: Sequence[str]) -> list[bytes]:
    """`batches` IngestEventsRequest messages of `batch` events (`flood_event_ids`) for
    users and items drawn from the given ones."""
    from lambdarec_client import make_event

    from online.pb import recommender_pb2 as pb

    rng = np.random.default_rng(100 + client)
    now = datetime.now(UTC)
    types = ("view", "view", "view", "click", "add_to_cart", "purchase")
    out = []
    for b in range(batches):
        us = rng.integers(0, len(users), batch)
        its = rng.integers(0, len(items), batch)
        kinds = rng.integers(0, len(types), batch)
        out.append(pb.IngestEventsRequest(events=[make_event({
            "event_id": eid, "user_id": users[us[i]], "item_id": items[its[i]],
            "event_type": types[kinds[i]], "ts": now})
            for i, eid in enumerate(flood_event_ids(client, b, batch))]).SerializeToString())
    return out


def write_flood_files(base: Path, *, clients: int, batches: int, batch: int,
                      users: Sequence[str], items: Sequence[str]) -> list[Path]:
    """One payload file per flood client (`bench.loadgen.write_payloads` format)."""
    from bench.loadgen import write_payloads

    files = []
    for c in range(clients):
        f = base / f"flood-{c}.bin"
        write_payloads(f, flood_payloads(c, batches=batches, batch=batch, users=users,
                                         items=items))
        files.append(f)
    return files


# -- the flood client (its own process) -----------------------------------------------------
def retry_after_s(exc: Any) -> float | None:
    """The server's hint of a RESOURCE_EXHAUSTED answer (trailing `retry-after-ms`)."""
    for k, v in exc.trailing_metadata() or ():
        if k == "retry-after-ms":
            return float(v) / 1000.0
    return None


def flood_client(target: str, payloads: list[bytes], *, key: str | None,
                 max_s: float) -> dict[str, Any]:
    """Send each payload until it is acknowledged (honouring retry hints) or `max_s` passes.

    Returns wall-clock start/end, answers by status code (one message of each), and per
    acknowledged batch its index, accepted and duplicate counts."""
    import grpc

    from online.pb import recommender_pb2 as pb

    mb = 64 * 1024 * 1024
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    codes: dict[str, int] = {}
    details: dict[str, str] = {}
    acked: list[tuple[int, int, int]] = []
    call_ms: list[float] = []
    hints: list[float] = []
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", mb),
                                                ("grpc.max_receive_message_length", mb)]) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        call = ch.unary_unary(INGEST)
        start = time.time()
        stop_at = time.monotonic() + max_s
        for b, p in enumerate(payloads):
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try:
                    raw = call(p, timeout=60, metadata=metadata)
                except grpc.RpcError as exc:
                    code = exc.code().name
                    codes[code] = codes.get(code, 0) + 1
                    details.setdefault(code, exc.details())
                    hint = retry_after_s(exc) if code == "RESOURCE_EXHAUSTED" else \
                        UNAVAILABLE_BACKOFF_S if code == "UNAVAILABLE" else None
                    if hint is None:
                        break  # not a retryable answer: this batch is given up
                    hints.append(hint)
                    time.sleep(hint)
                    continue
                call_ms.append(1000 * (time.perf_counter() - t))
                codes["OK"] = codes.get("OK", 0) + 1
                resp = pb.IngestEventsResponse.FromString(raw)
                acked.append((b, resp.accepted, resp.duplicates))
                break
        end = time.time()
    return {"start": start, "end": end, "codes": codes, "details": details, "acked": acked,
            "ok_call_ms": call_ms, "hint_s_max": max(hints) if hints else None}


def run_flood_clients(target: str, files: Sequence[Path], keys: Sequence[str | None], *,
                      max_s: float) -> list[dict[str, Any]]:
    """One `python -m bench.flood client` process per payload file, all at once; their
    `flood_client` results in file order."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "bench.flood", "client", "--target", target, "--payloads",
         str(f), "--max-s", str(max_s), *(["--key", k] if k else [])],
        cwd=PROJECT_ROOT, env=thread_env(), stdout=subprocess.PIPE, text=True)
        for f, k in zip(files, keys, strict=True)]
    out = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=max_s + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"flood client failed ({proc.returncode})")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def _client_main(argv: Sequence[str]) -> int:
    from bench.loadgen import read_payloads

    p = argparse.ArgumentParser(prog="python -m bench.flood client")
    p.add_argument("--target", required=True)
    p.add_argument("--payloads", type=Path, required=True)
    p.add_argument("--key", default=None)
    p.add_argument("--max-s", type=float, default=120.0)
    a = p.parse_args(argv)
    out = flood_client(a.target, read_payloads(a.payloads), key=a.key, max_s=a.max_s)
    print(json.dumps(out))
    return 0


# -- the probe -------------------------------------------------------------------------------
class Probe:
    """Recommend for one user at `hz` calls/s from a thread of this process. With `expect`,
    an answer whose item ids differ counts as code "WRONG"."""

    def __init__(self, target: str, key: str | None, hz: float, *, user: str = PROBE_USER,
                 k: int = 10, expect: list[str] | None = None) -> None:
        self.target, self.key, self.hz = target, key, hz
        self.user, self.k, self.expect = user, k, expect
        self.samples: list[tuple[float, float, str]] = []  # (wall start, seconds, code)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        import grpc

        from online.pb import recommender_pb2 as pb

        req = pb.RecommendRequest(user_id=self.user, k=self.k).SerializeToString()
        metadata = (("authorization", f"Bearer {self.key}"),) if self.key else None
        with grpc.insecure_channel(self.target) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            call = ch.unary_unary(RECOMMEND)
            for _ in range(20):  # warm the channel and the server's caches
                call(req, timeout=10, metadata=metadata)
            t0 = time.monotonic()
            i = 0
            while not self.stop.is_set():
                wall, t = time.time(), time.perf_counter()
                try:
                    raw = call(req, timeout=10, metadata=metadata)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                took = time.perf_counter() - t
                if code == "OK" and self.expect is not None:
                    got = [it.item_id for it in pb.RecommendResponse.FromString(raw).items]
                    code = "OK" if got == self.expect else "WRONG"
                self.samples.append((wall, took, code))
                i += 1
                self.stop.wait(max(0.0, t0 + i / self.hz - time.monotonic()))

    def between(self, start: float, end: float) -> tuple[list[float], dict[str, int]]:
        """Latencies (s) of the calls started in [start, end], and the non-OK codes."""
        lat: list[float] = []
        codes: dict[str, int] = {}
        for wall, s, code in list(self.samples):
            if start <= wall <= end:
                lat.append(s)
                if code != "OK":
                    codes[code] = codes.get(code, 0) + 1
        return lat, codes


def summary(probe: Probe, clients: list[dict[str, Any]]) -> dict[str, Any]:
    """Before/during latency figures (ms) and what the flood got."""
    start = min(c["start"] for c in clients)
    end = max(c["end"] for c in clients)
    first = probe.samples[0][0] if probe.samples else start
    before, before_errors = probe.between(first, start)
    during, during_errors = probe.between(start, end)
    codes: dict[str, int] = {}
    details: dict[str, str] = {}
    for c in clients:
        for code, n in c["codes"].items():
            codes[code] = codes.get(code, 0) + n
        details.update(c["details"])
    accepted = sum(a for c in clients for _, a, _ in c["acked"])
    ok_ms = [ms for c in clients for ms in c["ok_call_ms"]]
    return {"before": percentiles(before) | {"max": 1000 * max(before, default=0.0)},
            "during": percentiles(during) | {"max": 1000 * max(during, default=0.0)},
            "probe_errors": {"before": before_errors, "during": during_errors},
            "flood_s": end - start, "flood_codes": codes, "flood_details": details,
            "accepted": accepted, "events_s": accepted / max(1e-9, end - start),
            "ingest_call_ms": percentiles(np.asarray(ok_ms) / 1000.0) if ok_ms else {},
            "hint_s_max": max((c["hint_s_max"] or 0.0) for c in clients)}


@contextmanager
def _server_env(overrides: dict[str, str]) -> Iterator[None]:
    """`running_server` hands this process' environment to the server: set the overrides
    there for the block."""
    names = {f"LAMBDAREC__SERVER__{k}": v for k, v in overrides.items()}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(bb: Any, files: list[Path], keys_file: Path, overrides: dict[str, str], *,
            shared_key: bool, before_s: float, probe_hz: float,
            max_flood_s: float) -> dict[str, Any]:
    """One configuration: a fresh server, the probe alone, then the probe under the flood."""
    from online.keys import KeyStore

    store = KeyStore(keys_file)
    if shared_key:
        flood_keys = [store.create("flood", ["ingest"])[1]] * len(files)
    else:
        flood_keys = [store.create(f"flood-{c}", ["ingest"])[1] for c in range(len(files))]
    probe_key = store.create("shop", ["recommend"])[1]
    with _server_env({**overrides, "KEYS_FILE": str(keys_file)}), running_server(bb) as srv, \
            Probe(srv.target, probe_key, probe_hz) as probe:
        time.sleep(before_s + 0.5)  # + the probe's warm-up calls
        clients = run_flood_clients(srv.target, files, flood_keys, max_s=max_flood_s)
        time.sleep(0.5)
    return summary(probe, clients)


def run(report: Report, *, n_items: int = 20_000, n_users: int = 20_000, clients: int = 4,
        batches: int = 10, batch: int = 10_000, before_s: float = 5.0,
        probe_hz: float = 100.0, max_flood_s: float = 120.0,
        configs: Sequence[str] = tuple(CONFIGS)) -> dict[str, Any]:
    bb, _ = ensure_bundle(n_items, n_users=n_users)
    base = scratch_dir("flood-")
    out: dict[str, Any] = {}
    rows = []
    try:
        # known users and items; never the probe's user
        files = write_flood_files(base, clients=clients, batches=batches, batch=batch,
                                  users=[f"u{i}" for i in range(1, n_users)],
                                  items=[f"i{i}" for i in range(n_items)])
        for name in configs:
            print(f"[bench] flood: {name}", file=sys.stderr, flush=True)
            r = measure(bb, files, base / f"keys-{name}.json", CONFIGS[name],
                        shared_key=name in SHARED_KEY, before_s=before_s, probe_hz=probe_hz,
                        max_flood_s=max_flood_s)
            out[name] = r
            print(f"[bench] flood {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            report.add(f"flood.{name}.recommend_p99_ms", r["during"]["p99"], "ms",
                       "same probe before the flood", r["before"]["p99"])
            rows.append((name, r))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report.note("Fairness under an ingest flood", "\n".join([
        f"{clients} flood clients (own processes) x {batches} IngestEvents batches of "
        f"{batch:,} events, each re-sent after the server's retry hint until acknowledged; a "
        f"probe calls Recommend for known user {PROBE_USER} at {probe_hz:.0f}/s with its own "
        f"key. Before = the probe alone, the {before_s:.0f} s before the flood on the same "
        f"server. Goal: p99 during the flood <= {TARGET_P99_MS:.0f} ms. `unprotected` turns "
        "the rate limits, the ingest bound, the GIL switch interval and the GC threshold "
        "off (the old behaviour); `one-key`: the flood clients share one key.",
        "", "| config | before p50 / p99 ms | during p50 / p99 / max ms | flood s | accepted "
        "events/s | flood answers |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {n} | {r['before']['p50']:.1f} / {r['before']['p99']:.1f} | "
          f"{r['during']['p50']:.1f} / {r['during']['p99']:.1f} / {r['during']['max']:.0f} | "
          f"{r['flood_s']:.1f} | {r['events_s']:,.0f} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(r['flood_codes'].items()))} |"
          for n, r in rows]]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return _client_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 clients x 3 batches")
    p.add_argument("--configs", default=",".join(CONFIGS))
    a = p.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    report = Report()
    if a.quick:
        run(report, clients=2, batches=3, before_s=2.0, configs=configs)
    else:
        run(report, configs=configs)
    print(f"[bench] report: {report.write()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
