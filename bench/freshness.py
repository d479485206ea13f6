"""Freshness: from an IngestEvents acknowledgement to a Recommend that reflects the events.

Per trial a brand-new user (popularity fallback so far) ingests views of three items of
one taste cluster; then Recommend is polled until the answer is personalised and at least
half of the top 10 lie in that cluster. Reported: time from the ack to that answer
(p50/p99) and polls needed, against a plain Recommend round trip in the same run (read-
your-writes means the first Recommend after the ack should already reflect the event, so
the ratio says how many round trips freshness costs). Oryx folds in every ~10 s and Gorse
refits hourly (PRODUCT.md) — the bar.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.fixtures import ensure_bundle, percentiles, running_server
from bench.online import _cluster_items
from bench.report import Report

K = 10
MAX_WAIT_S = 30.0


def run(report: Report, *, n_items: int = 1_000_000, n_users: int = 100_000,
        trials: int = 200) -> dict[str, Any]:
    from lambdarec_client import Client

    from online.pb import recommender_pb2 as pb

    bb, _ = ensure_bundle(n_items, n_users=n_users)
    world = bb.world()
    item_cluster = world["item_cluster"]
    by_cluster = _cluster_items(item_cluster)
    big = [c for c, ix in by_cluster.items() if len(ix) >= 50]
    rng = np.random.default_rng(17)
    ack_to_fresh, send_to_fresh, polls, rtts, ingest_ms = [], [], [], [], []
    stale = 0
    hits: list[float] = []
    run_id = datetime.now(UTC).strftime("%H%M%S")
    with running_server(bb) as srv, Client(srv.target, timeout=10.0) as c:
        for _ in range(20):  # warm the channel
            c.recommend(f"u{int(rng.integers(n_users))}", K)
        for t in range(trials):
            uid = f"fresh-{run_id}-{t}"
            cl = int(rng.choice(big))
            before = c.recommend(uid, K)
            items = rng.choice(by_cluster[cl], size=3, replace=False)
            events = [{"event_id": f"{uid}-{j}", "user_id": uid, "item_id": f"i{it}",
                       "event_type": "view"} for j, it in enumerate(items)]
            t_send = time.perf_counter()
            r = c.ingest(events)
            t_ack = time.perf_counter()
            if r.accepted != len(events):
                raise RuntimeError(f"ingest not accepted: {r}")
            n = 0
            old = [x.item_id for x in before.items]
            while True:
                n += 1
                resp = c.recommend(uid, K)
                if (resp.strategy == pb.STRATEGY_PERSONALISED
                        and [x.item_id for x in resp.items] != old):
                    hits.append(sum(item_cluster[int(x.item_id[1:])] == cl
                                    for x in resp.items) / K)
                    break
                if time.perf_counter() - t_ack > MAX_WAIT_S:
                    stale += 1
                    break
            t_fresh = time.perf_counter()
            ack_to_fresh.append(t_fresh - t_ack)
            send_to_fresh.append(t_fresh - t_send)
            ingest_ms.append(t_ack - t_send)
            polls.append(n)
            if before.strategy != pb.STRATEGY_FALLBACK:
                raise RuntimeError(f"{uid} was not new: {before.strategy}")
            # Reference: a plain Recommend round trip of a known user, interleaved.
            t0 = time.perf_counter()
            c.recommend(f"u{int(rng.integers(n_users))}", K)
            rtts.append(time.perf_counter() - t0)
    a, s, rt, ing = (percentiles(x) for x in (ack_to_fresh, send_to_fresh, rtts, ingest_ms))
    tag = f"n{n_items}"
    report.add(f"freshness.{tag}.ack_to_fresh_recommend.p50_ms", a["p50"], "ms",
               "plain Recommend round trip p50", rt["p50"])
    report.add(f"freshness.{tag}.ack_to_fresh_recommend.p99_ms", a["p99"], "ms",
               "plain Recommend round trip p99", rt["p99"])
    report.add(f"freshness.{tag}.send_to_fresh_recommend.p50_ms", s["p50"], "ms",
               "plain Recommend round trip p50", rt["p50"])
    report.add(f"freshness.{tag}.send_to_fresh_recommend.p99_ms", s["p99"], "ms",
               "plain Recommend round trip p99", rt["p99"])
    report.add(f"freshness.{tag}.polls_until_fresh.mean", float(np.mean(polls)), "Recommend calls",
               "ideal (read-your-writes)", 1.0)
    report.note("Freshness: ingest ack to a Recommend that reflects it", "\n".join([
        f"{trials} new users on the {n_items:,}-item server; each ingests 3 views of one "
        "taste cluster, then polls Recommend until the answer changes from its popularity "
        "fallback to a personalised list.", "",
        "| measure | p50 ms | p99 ms |", "|---|---:|---:|",
        f"| IngestEvents call (3 events, durable) | {ing['p50']:.2f} | {ing['p99']:.2f} |",
        f"| ack -> fresh Recommend answer | {a['p50']:.2f} | {a['p99']:.2f} |",
        f"| send -> fresh Recommend answer | {s['p50']:.2f} | {s['p99']:.2f} |",
        f"| plain Recommend round trip (reference) | {rt['p50']:.2f} | {rt['p99']:.2f} |", "",
        f"Polls needed: mean {np.mean(polls):.2f}, max {max(polls)}; trials never fresh "
        f"within {MAX_WAIT_S:.0f} s: {stale}. Share of the fresh top 10 from the viewed "
        f"cluster: mean {float(np.mean(hits)) if hits else float('nan'):.2f}. "
        "Peers: Oryx folds in every ~10 s, Gorse refits "
        "hourly."]))
    return {"ack_to_fresh": a, "send_to_fresh": s, "rtt": rt, "polls_max": max(polls),
            "stale": stale}
