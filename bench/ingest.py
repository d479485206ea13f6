"""Durable ingest: IngestEvents through gRPC and IngestPipeline in-process, against raw
write + fdatasync of the same bytes to a plain file on the same disk, in the same run.

* raw: one `os.write` + `os.fdatasync` per batch of the exact payload the WAL writes for
  that batch (`online.ingest` encodes validated events as compact JSON rows) — the floor
  for "durable before acknowledged" at one fsync per batch.
* pipeline: `IngestPipeline.ingest` (validate, de-duplicate, WAL group commit, bronze flush
  in the background), 1 and 4 calling threads.
* gRPC: `bench.loadgen` sends pre-serialised IngestEventsRequest messages (unique event ids,
  each sent once) to `python -m online.server`, 1 and 4 in flight; that path also folds
  every event into its user's online state.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import ensure_bundle, running_server, scratch_dir
from bench.report import Report

INGEST = "/lambdarec.v1.Recommender/IngestEvents"
TYPES = ("view", "view", "view", "click", "add_to_cart", "purchase")


def make_events(n: int, *, prefix: str, n_users: int, n_items: int,
                seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    types = rng.integers(0, len(TYPES), n)
    now = datetime.now(UTC)
    return [{"event_id": f"{prefix}-{i}", "user_id": f"u{users[i]}", "item_id": f"i{items[i]}",
             "event_type": TYPES[types[i]], "ts": now, "session_id": f"s{users[i]}"}
            for i in range(n)]


def raw_fsync(base: Path, events: list[dict[str, Any]], batch: int) -> dict[str, float]:
    from lake.validation import validate_event
    from online.ingest import _encode_rows, _wal_row

    now = datetime.now(UTC)
    payloads = [_encode_rows([_wal_row(validate_event(j, e, now=now))
                              for j, e in enumerate(events[i:i + batch])])
                for i in range(0, len(events), batch)]
    path = base / f"raw-{batch}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    t0 = time.perf_counter()
    try:
        for p in payloads:
            os.write(fd, p)
            os.fdatasync(fd)
    finally:
        dt = time.perf_counter() - t0
        os.close(fd)
    return {"events_s": len(events) / dt, "ms_per_batch": dt * 1000 / len(payloads),
            "bytes_per_event": sum(map(len, payloads)) / len(events)}


def pipeline(base: Path, events: list[dict[str, Any]], batch: int,
             threads: int) -> dict[str, Any]:
    from lake.config import load_settings
    from lake.tables import Lake
    from online.ingest import IngestPipeline

    d = base / f"pipe-{batch}-{threads}"
    s = load_settings(env={}, overrides={"lake": {"root": str(d / "lake")}, "server": {
        "wal_dir": str(d / "wal"), "max_batch": 10_000}})
    p = IngestPipeline(s, Lake(d / "lake"), max_pending_events=10**7)
    p.start()
    batches = [events[i:i + batch] for i in range(0, len(events), batch)]
    per = [batches[t::threads] for t in range(threads)]

    def work(t: int) -> None:
        for b in per[t]:
            p.ingest(b)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    st = p.stats()
    t1 = time.perf_counter()
    p.close()
    return {"events_s": len(events) / dt, "ms_per_call": dt * 1000 * threads / len(batches),
            "fsyncs": st["wal_fsyncs"], "calls": len(batches),
            "flush_commits": st["flush_commits"], "close_s": time.perf_counter() - t1}


def grpc_payloads(events: list[dict[str, Any]], batch: int) -> list[bytes]:
    from lambdarec_client import make_event

    from online.pb import recommender_pb2 as pb

    return [pb.IngestEventsRequest(events=[make_event(e) for e in events[i:i + batch]])
            .SerializeToString() for i in range(0, len(events), batch)]


def run(report: Report, *, total_events: int = 50_000, n_items: int = 100_000,
        n_users: int = 100_000, batches: tuple[int, ...] = (100, 1000),
        concurrency: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
    from bench.loadgen import write_payloads
    from bench.online import run_loadgen

    base = scratch_dir("ingest-")  # same disk as the WAL
    out: dict[str, Any] = {}
    rows = []
    try:
        raw = {b: raw_fsync(base, make_events(total_events, prefix=f"r{b}", n_users=n_users,
                                              n_items=n_items), b) for b in batches}
        for b in batches:
            for th in (1, 4):
                r = pipeline(base, make_events(total_events, prefix=f"p{b}-{th}",
                                               n_users=n_users, n_items=n_items), b, th)
                report.add(f"ingest.pipeline.batch{b}.threads{th}.events_s", r["events_s"],
                           "events/s", f"raw write+fdatasync batch{b}", raw[b]["events_s"])
                rows.append((f"IngestPipeline in-process, {th} thread(s)", b, r["events_s"],
                             raw[b]["events_s"], f"{r['fsyncs']} fsyncs / {r['calls']} calls, "
                             f"{r['flush_commits']} bronze commits"))
                out[f"pipeline.{b}.{th}"] = r
        bb, _ = ensure_bundle(n_items, n_users=n_users)
        with running_server(bb) as srv:
            for b in batches:
                evs = make_events(total_events * len(concurrency), prefix=f"g{b}",
                                  n_users=n_users, n_items=n_items)
                f = base / f"ingest-{b}.bin"
                payloads = grpc_payloads(evs, b)
                write_payloads(f, payloads)
                res = run_loadgen(srv.target, INGEST, f, concurrency=list(concurrency),
                                  duration=0, max_requests=len(payloads) // len(concurrency),
                                  once=True, warmup=0)
                for lv in res["levels"]:
                    c = lv["concurrency"]
                    ev_s = lv["rps"] * b
                    report.add(f"ingest.grpc.batch{b}.c{c}.events_s", ev_s, "events/s",
                               f"raw write+fdatasync batch{b}", raw[b]["events_s"])
                    report.add(f"ingest.grpc.batch{b}.c{c}.p99_ms", lv["p99_ms"], "ms/call",
                               f"raw write+fdatasync ms/batch{b}", raw[b]["ms_per_batch"])
                    rows.append((f"gRPC IngestEvents, {c} in flight", b, ev_s,
                                 raw[b]["events_s"], f"p50 {lv['p50_ms']:.1f} ms, p99 "
                                 f"{lv['p99_ms']:.1f} ms per call, errors {lv['errors']}"))
                    out[f"grpc.{b}.{c}"] = lv
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report.note("Ingest: durable events/s", "\n".join([
        f"{total_events:,} events per measurement; raw = one write + fdatasync per batch of the "
        f"WAL's own bytes ({raw[batches[0]]['bytes_per_event']:.0f} B/event) to a plain file "
        "on the same disk.", "",
        "| path | batch | events/s | raw fsync events/s | ratio | notes |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {p} | {b} | {v:,.0f} | {r:,.0f} | {v / r:.2f} | {n} |"
          for p, b, v, r, n in rows]]))
    return out
