"""Online state under concurrency and its memory caps (known bundle: tests/online_bundles.py).

* Many threads on one user (ingest, Recommend with and without a basket, profile, refold)
  must never see a half-changed user.
* `server.max_online_users` / `server.max_online_events` drop the users seen least
  recently; a dropped user comes back with their next event, and what they gave items
  unknown to the model goes with them.
* The warm start rebuilds the users who sent the latest events, up to the caps.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import online_bundles as kb
import pyarrow as pa
import pytest

from lake.config import load_settings
from lake.strength import StrengthParams
from online.catalog import Catalog
from online.model_manager import ModelManager
from online.recommender import FilterSpec, Recommender
from online.state import OnlineState, Popularity
from online.warm_start import latest_users, restore_popularity

RACE_SECONDS = 2.0
T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


def make_engine(tmp_path: Path, **server: Any) -> Recommender:
    settings = load_settings(env={}, overrides={
        "model": {"dir": str(tmp_path / "models")}, "lake": {"root": str(tmp_path / "lake")},
        "server": server})
    kb.build(Path(settings.model.dir), "v1")
    state = OnlineState(settings)
    manager = ModelManager(settings, on_new_model=lambda new, old: state.refold(new))
    manager.reload()
    return Recommender(settings, manager, state, Catalog(None))


def ev(user: str, item: str, etype: str = "view", ts: datetime | None = None) -> dict:
    return {"user_id": user, "item_id": item, "event_type": etype,
            "ts": ts or datetime.now(UTC)}


@contextmanager
def fast_thread_switches() -> Iterator[None]:
    """Switch threads every few microseconds (default 5 ms), so a race that needs a switch
    in the middle of a short loop happens in every run, not once in a while."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# -- concurrency -------------------------------------------------------------------------
def test_many_threads_on_one_user_never_see_it_half_changed(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    model = eng.manager.current
    assert model is not None
    items = [*kb.cluster_items("A"), *kb.cluster_items("B"), *kb.cluster_items("C")]
    # A full window of recent events: every new one shifts it, and reading it takes long.
    eng.apply_events([ev("hot", items[i % len(items)]) for i in range(500)])
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: dict[str, int] = {}

    def loop(name: str, step: Any) -> None:
        n = 0
        try:
            while not stop.is_set():
                step(n)
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
            stop.set()
        counts[name] = n

    steps = {
        "ingest-1": lambda n: eng.apply_events([ev("hot", items[n % 30], "purchase")]),
        "ingest-2": lambda n: eng.apply_events([ev("hot", f"new-{n % 50}", "view")]),
        "recommend": lambda n: eng.recommend("hot", 3, FilterSpec()),
        "basket": lambda n: eng.recommend("hot", 3, FilterSpec(), context_item_ids=["C5"]),
        "profile": lambda n: eng.state.profile(model, "hot"),
        "refold": lambda n: eng.state.refold(model),
    }
    threads = [threading.Thread(target=loop, args=(name, step), name=name, daemon=True)
               for name, step in steps.items()]
    with fast_thread_switches():
        for t in threads:
            t.start()
        stop.wait(RACE_SECONDS)
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]} (calls: {counts})"
    assert all(counts.get(name, 0) > 0 for name in steps), counts
    # and the user ends where a fresh state with the same events would be
    st = eng.state.get("hot")
    assert st is not None and len(st.events) == 500
    got = eng.state.profile(model, "hot")
    fresh = OnlineState(eng.settings)
    fresh.apply(model, [{"user_id": "hot", "item_id": e.item_id, "event_type": e.event_type,
                         "ts": e.ts, "received_at": e.received_at}
                        for e in eng.state.recent_events("hot")])
    want = fresh.profile(model, "hot")
    assert got.vector is not None and want.vector is not None
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-5)


# -- caps ---------------------------------------------------------------------------------
def test_the_user_seen_least_recently_is_dropped_at_the_user_cap(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, max_online_users=3)
    for u in ("u1", "u2", "u3", "u1", "u4"):  # u1 came back: u2 is now the oldest
        eng.apply_events([ev(u, "A3")])
    assert eng.state.users() == ["u3", "u1", "u4"]
    assert eng.state.get("u2") is None and eng.state.evicted_users == 1
    assert len(eng.state.get("u1").events) == 2  # type: ignore[union-attr]


def test_the_events_cap_counts_events_and_seen_items(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, recent_events_per_user=4, seen_items_per_user=4,
                      max_online_events=10, seen_event_types=["view"])
    state = eng.state
    eng.apply_events([ev("a", "A2"), ev("a", "A3"), ev("a", "A4")])  # 3 events + 3 seen
    eng.apply_events([ev("b", "B2", "purchase")])  # not a seen type: 1 event
    assert state.events_held == 7
    eng.apply_events([ev("c", "C2"), ev("c", "C3")])  # 4 more: 11 > 10, `a` goes
    assert state.users() == ["b", "c"] and state.events_held == 5
    # one user at both per-user caps (4 + 4) pushes out everyone else
    eng.apply_events([ev("d", f"C{i}") for i in range(9)])
    assert state.users() == ["d"] and state.events_held == 8
    assert [e.item_id for e in state.recent_events("d")] == ["C5", "C6", "C7", "C8"]
    assert state.forget("d") and state.events_held == 0 and len(state) == 0


def test_the_events_cap_must_hold_one_full_user(tmp_path: Path) -> None:
    from lake.config import ConfigError

    with pytest.raises(ConfigError, match=r"server\.max_online_events: .*at least "
                       r"server\.recent_events_per_user \+ server\.seen_items_per_user \(5500\)"):
        load_settings(env={"LAMBDAREC__SERVER__MAX_ONLINE_EVENTS": "5499"})


def test_a_dropped_user_is_served_from_the_batch_and_comes_back_with_an_event(
    tmp_path: Path,
) -> None:
    eng = make_engine(tmp_path, max_online_users=2)
    eng.apply_events([ev("uA0", "C3", "purchase"), ev("newbie", "B4", "purchase")])
    assert eng.recommend("newbie", 2, FilterSpec()).strategy == "personalised"
    eng.apply_events([ev("x1", "A5"), ev("x2", "A6")])  # both dropped
    assert eng.state.get("uA0") is None and eng.state.get("newbie") is None
    # the batch user keeps their batch vector; the online-only one is a stranger again
    assert [i for i, _, _ in eng.recommend("uA0", 3, FilterSpec()).items] == ["A2", "A3", "A4"]
    assert eng.recommend("newbie", 2, FilterSpec()).strategy == "fallback"
    eng.apply_events([ev("newbie", "C6", "purchase")])  # back, with the new event
    out = eng.recommend("newbie", 2, FilterSpec())
    assert out.strategy == "personalised" and [i for i, _, _ in out.items] == ["C0", "C1"]
    assert [e.item_id for e in eng.state.recent_events("newbie")] == ["C6"]


def test_a_dropped_user_leaves_the_unknown_items_they_touched(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, max_online_users=2)
    eng.apply_events([ev("junk-1", "made-up-1", "purchase")])
    eng.apply_events([ev("uA0", "made-up-2", "purchase"), ev("uA1", "made-up-2", "purchase")])
    assert eng.state.pending_items() == 1  # junk-1 went, and made-up-1 with them
    eng.apply_events([ev("uB0", "A5")])  # uA0 goes; uA1 still follows made-up-2
    assert eng.state.pending_items() == 1


def test_trim_gives_back_what_the_new_model_learned(tmp_path: Path) -> None:
    from lake.training_cut import TrainingCut
    from online.model_loading import load_model

    eng = make_engine(tmp_path, seen_event_types=["purchase"])
    eng.apply_events([ev("t", "A5", ts=T0), ev("t", "A6", ts=T0 + timedelta(days=2))])
    assert eng.state.events_held == 2
    model = load_model(kb.build(Path(eng.settings.model.dir), "v2", make_current=False))
    model.cut = TrainingCut(T0 + timedelta(days=1))
    assert eng.state.trim(model) == 1 and eng.state.events_held == 1


def test_a_made_up_user_costs_a_few_hundred_bytes(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    n = 5000
    now = datetime.now(UTC)
    batches = [[{"user_id": f"junk-{b:04d}-{i:04d}", "item_id": f"A{i % 10}",
                 "event_type": "view", "value": None, "ts": now, "received_at": now}
                for i in range(100)] for b in range(n // 100)]
    eng.apply_events(batches[0])  # first-call allocations (interned ids, caches) aside
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches[1:]:
            eng.apply_events(batch)
        del batches
        gc.collect()
        per_user = (tracemalloc.get_traced_memory()[0] - before) / (n - 100)
    finally:
        tracemalloc.stop()
    assert len(eng.state) == n
    # measured ~600 B (the user id and its entry included); it was ~1,470 B with a deque
    # and datetimes per event
    assert per_user < 800, f"{per_user:.0f} bytes per one-event user"


# -- warm start ---------------------------------------------------------------------------
def _bronze(rows: list[tuple[str, str, int]]) -> pa.Table:
    """(user, item, arrival minute) rows as bronze columns; ts one hour before arrival."""
    ts_type = pa.timestamp("us", tz="UTC")
    return pa.table({
        "user_id": [u for u, _, _ in rows], "item_id": [i for _, i, _ in rows],
        "event_type": ["view"] * len(rows), "value": pa.nulls(len(rows), pa.float64()),
        "ts": pa.array([T0 + timedelta(minutes=m - 60) for _, _, m in rows], ts_type),
        "received_at": pa.array([T0 + timedelta(minutes=m) for _, _, m in rows], ts_type),
    })


def picked(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("user_id").to_pylist(), table.column("item_id").to_pylist(),
                    strict=True))


def test_warm_start_takes_the_users_with_the_latest_events_in_arrival_order() -> None:
    table = _bronze([("a", "a1", 1), ("b", "b1", 2), ("a", "a2", 3), ("c", "c1", 4),
                     ("a", "a3", 6), ("b", "b2", 5), ("d", "d1", 0)])
    # latest first: a (6), b (5), c (4), d (0)
    assert picked(latest_users(table, max_users=2, per_user=10, max_events=100)) == [
        ("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3")]
    assert picked(latest_users(table, max_users=10, per_user=1, max_events=100)) == [
        ("d", "d1"), ("c", "c1"), ("b", "b2"), ("a", "a3")]
    # a (2 kept) + b (2) fit 4 events; c would make 5
    assert picked(latest_users(table, max_users=10, per_user=2, max_events=4)) == [
        ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3")]
    # the latest user is taken even when alone over the budget
    assert picked(latest_users(table, max_users=10, per_user=5, max_events=1)) == [
        ("a", "a1"), ("a", "a2"), ("a", "a3")]
    assert latest_users(table.slice(0, 0), max_users=1, per_user=1, max_events=1).num_rows == 0


def test_warm_start_popularity_counts_every_event_as_the_model_weighs_it() -> None:
    pop = Popularity(7.0)
    rows = [("u1", "x", 1), ("u2", "x", 2), ("u3", "y", 3)]
    table = _bronze(rows).set_column(2, "event_type", pa.array(["view", "view", "purchase"]))
    restore_popularity(pop, table, StrengthParams({"view": 1.0, "purchase": 8.0}))
    # by hand: y 8 (one purchase at minute 3) against x's two views at minutes 1 and 2,
    # each older by its minutes on a 7-day (10,080-minute) half-life
    assert pop.score("y") == pytest.approx(1.0)
    assert pop.score("x") == pytest.approx((2 ** (-2 / 10080) + 2 ** (-1 / 10080)) / 8)
    assert [i for i, _ in pop.ranking()[0]] == ["y", "x"]


def test_a_restart_rebuilds_only_the_latest_users_up_to_the_cap(tmp_path: Path) -> None:
    from lambdarec_client import Client

    from online.server import create_server

    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "wal_dir": str(tmp_path / "wal"), "max_online_users": 5}})
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    kb.build(Path(settings.model.dir), "v1", as_of=yesterday)
    server, ports = create_server(settings)
    server.start()
    try:
        with Client(f"127.0.0.1:{ports['grpc']}", timeout=10) as client:
            for u in range(12):
                client.ingest([{"event_id": f"e{u}", "user_id": f"w{u:02d}",
                                "item_id": "C4", "event_type": "purchase"}])
        assert server.engine.state.users() == [f"w{u:02d}" for u in range(7, 12)]
    finally:
        server.stop(grace=1)
    assert server.lake.count("bronze_events") == 12  # nothing acknowledged was dropped
    server, ports = create_server(settings)
    t = time.perf_counter()
    server.start()
    try:
        assert server.engine.state.users() == [f"w{u:02d}" for u in range(7, 12)]
        assert time.perf_counter() - t < 30
        out = server.engine.recommend("w11", 2, FilterSpec())
        assert out.strategy == "personalised" and [i for i, _, _ in out.items] == ["C0", "C1"]
        # popularity kept every event, the dropped users' too
        assert server.engine.state.popularity.score("C4") == pytest.approx(1.0)
    finally:
        server.stop(grace=1)
