"""Closed-loop gRPC load generator, run as its own process (it must not share the
server's GIL).

It sends pre-serialised request bytes (no protobuf work on the client side, so the
client costs the same for every target) to one unary method, keeping `concurrency`
calls in flight on one grpc.aio channel, for a fixed duration and/or request count per
level. Prints one JSON object: per level the requests, errors, wall seconds, throughput
and latency percentiles (ms).

    python -m bench.loadgen --target 127.0.0.1:50051 \
        --method /lambdarec.v1.Recommender/Recommend --payloads reqs.bin \
        --concurrency 1,4,16 --duration 5 --max-requests 20000 [--once]

`--payloads` holds length-prefixed messages (`write_payloads`). `--once` sends each
payload exactly once, in order (ingest batches whose event ids must be unique).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_payloads(path: Path, payloads: Sequence[bytes]) -> None:
    with Path(path).open("wb") as f:
        for p in payloads:
            f.write(struct.pack("<I", len(p)))
            f.write(p)


def read_payloads(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _pct(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan")}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


async def _level(channel, method: str, payloads: list[bytes], start: int, concurrency: int,
                 duration: float, max_requests: int, once: bool, timeout: float) -> dict:
    import grpc

    call = channel.unary_unary(method)  # no (de)serialisers: raw bytes both ways
    lat: list[float] = []
    errors: dict[str, int] = {}
    state = {"i": 0, "bytes": 0}
    n_payloads = len(payloads)
    t_start = time.perf_counter()
    stop_at = t_start + duration if duration > 0 else float("inf")

    async def worker() -> None:
        while True:
            i = state["i"]
            if i >= max_requests or (once and start + i >= n_payloads):
                return
            if time.perf_counter() >= stop_at:
                return
            state["i"] = i + 1
            p = payloads[(start + i) % n_payloads]
            t = time.perf_counter()
            try:
                resp = await call(p, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                key = exc.code().name
                errors[key] = errors.get(key, 0) + 1
                continue
            lat.append(time.perf_counter() - t)
            state["bytes"] += len(resp)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "seconds": wall, "rps": len(lat) / wall if wall > 0 else 0.0,
            "mean_response_bytes": state["bytes"] / max(1, len(lat)), "sent": state["i"],
            **_pct(lat)}


async def _run(args: argparse.Namespace) -> dict:
    import grpc

    payloads = read_payloads(args.payloads)
    if not payloads:
        raise SystemExit("no payloads")
    mb = 64 * 1024 * 1024
    async with grpc.aio.insecure_channel(args.target, options=[
            ("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)]
    ) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        pos = 0
        if args.warmup > 0 and not args.once:
            await _level(ch, args.method, payloads, 0, max(args.concurrency), args.warmup,
                         10**9, False, args.timeout)
        levels = []
        for c in args.concurrency:
            r = await _level(ch, args.method, payloads, pos, c, args.duration,
                             args.max_requests, args.once, args.timeout)
            if args.once:
                pos += r["sent"]
            levels.append(r)
    return {"target": args.target, "method": args.method, "payloads": len(payloads),
            "levels": levels}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--payloads", type=Path, required=True)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per level (0: none)")
    p.add_argument("--max-requests", type=int, default=100_000, help="per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the levels")
    p.add_argument("--once", action="store_true", help="each payload once, in order")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline (s)")
    args = p.parse_args(argv)
    out = asyncio.run(_run(args))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
