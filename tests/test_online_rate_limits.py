"""Per-key rate limits, the batch-size bound and the ingest gate: a real server on 127.0.0.1
(port 0) with real access keys, the real ingest pipeline; the gate itself with real threads.

Limits are small here (100 events/s = `server.max_batch`, 20 calls/s) so a test crosses them
in a few calls. The sliding-window counter weighs the last second's count, so a call costing
more than half the limit right after a full window is refused whatever the window's phase.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lambdarec_client import Client, make_event
from test_online_server import TOKEN, Running, code_of, ev

from lake.config import ConfigError, load_settings
from online.errors import ResourceExhausted
from online.keys import KeyStore
from online.pb import recommender_pb2 as pb
from online.pb import recommender_pb2_grpc
from online.rate_limits import IngestGate

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def refusal(fn) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """The message and `retry-after-ms` hint (in s) of a RESOURCE_EXHAUSTED answer."""
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    assert ei.value.code() == EXHAUSTED, ei.value.details()
    hints = [v for k, v in ei.value.trailing_metadata() or () if k == "retry-after-ms"]
    assert len(hints) == 1, ei.value.trailing_metadata()
    return ei.value.details(), int(hints[0]) / 1000.0


def events(user: str, n: int) -> list[dict]:
    return [ev(user, f"A{i % 10}") for i in range(n)]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("limits")
    store = KeyStore(tmp / "lake" / "access_keys.json")
    keys = {name: store.create(name, ("recommend", "ingest"))[1]
            for name in ("a", "b", "c", "d", "big")}
    run = Running(tmp, rate_limit_events_per_s=100, rate_limit_calls_per_s=20)
    yield run, keys
    run.close()


def client(run: Running, key: str | None) -> Client:
    return Client(run.target, run.admin_target, token=TOKEN, key=key, timeout=10)


def test_a_key_over_its_events_rate_is_told_when_to_retry_and_others_are_not_affected(
        limited: tuple[Running, dict[str, str]]) -> None:
    run, keys = limited
    with client(run, keys["a"]) as a, client(run, keys["b"]) as b:
        assert a.ingest(events("rl-a", 100)).accepted == 100  # the whole second's budget
        message, hint = refusal(lambda: a.ingest(events("rl-a", 60)))
        assert message.startswith(
            "IngestEvents: events of access key 'a' over server.rate_limit_events_per_s "
            "(100/s; this call 60): retry in "), message
        assert message.endswith(" s")
        assert 0.0 < hint <= 2.0
        assert abs(float(message.split("retry in ")[1][:-2]) - hint) <= 0.1 * hint + 0.01
        # another key has its own budget
        assert b.ingest(events("rl-b", 100)).accepted == 100
        # the hint is right: after it, the same call goes through
        time.sleep(hint)
        assert a.ingest(events("rl-a", 60)).accepted == 60


def test_a_key_over_its_calls_rate_is_refused_and_health_checks_are_not_counted(
        limited: tuple[Running, dict[str, str]]) -> None:
    run, keys = limited
    with client(run, keys["c"]) as c, client(run, keys["d"]) as d:
        codes = []
        t0 = time.monotonic()
        for _ in range(40):  # 20/s: at most ~30 pass in any half second
            try:
                c.recommend("uA0", k=3)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                last = exc
        took = time.monotonic() - t0
        assert codes.count(EXHAUSTED) + codes.count(grpc.StatusCode.OK) == 40, codes
        assert codes.count(EXHAUSTED) > 0, (took, codes)
        if took < 0.5:
            assert codes.count(EXHAUSTED) >= 10, codes
        assert last.details().startswith("Recommend: calls of access key 'c' over "
                                         "server.rate_limit_calls_per_s (20/s; this call 1): "
                                         "retry in "), last.details()
        assert [i.item_id for i in d.recommend("uA0", k=3).items] == ["A2", "A3", "A4"]
    with grpc.insecure_channel(run.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(50):
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_calls_without_a_key_are_not_rate_limited(tmp_path: Path) -> None:
    """Limits share a server fairly between keys; an open loopback port (no keys: make run,
    a harness loading a dataset) has none to share between, and the ingest gate still keeps
    Recommend's latency bounded there."""
    run = Running(tmp_path, rate_limit_events_per_s=100)  # no keys: an open loopback port
    try:
        with client(run, None) as one, client(run, None) as two:
            assert one.ingest(events("open-1", 100)).accepted == 100
            assert two.ingest(events("open-2", 100)).accepted == 100
            assert one.ingest(events("open-3", 100)).accepted == 100
    finally:
        run.close()


def test_an_oversized_batch_is_refused_naming_the_field_before_it_costs_anything(
        limited: tuple[Running, dict[str, str]]) -> None:
    run, keys = limited
    with client(run, keys["big"]) as big:
        code, message = code_of(lambda: big.ingest(events("big", 101)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == "events: at most 100 entries (server.max_batch), got 101"
        # refused before the rate limit counted it: the whole budget is still there
        assert big.ingest(events("big", 100)).accepted == 100


def test_the_ingest_gate_runs_one_call_queues_a_few_and_refuses_the_rest() -> None:
    gate = IngestGate(concurrency=1, queue=1, wait_s=5.0)
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def holder() -> None:
        with gate.turn():
            order.append("first in")
            inside.set()
            release.wait(10)
            order.append("first out")

    def waiter() -> None:
        with gate.turn():
            order.append("second in")

    t1 = threading.Thread(target=holder)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=waiter)
    t2.start()
    deadline = time.monotonic() + 10
    while gate.waiting == 0 and time.monotonic() < deadline:  # the second one queued
        time.sleep(0.001)
    with pytest.raises(ResourceExhausted) as ei, gate.turn():
        pass
    assert ei.value.message.startswith(
        "IngestEvents: too many ingest calls in progress (server.ingest_concurrency 1, "
        "server.ingest_queue 1): retry in ")
    assert ei.value.retry_after_s > 0
    release.set()
    t1.join(10)
    t2.join(10)
    assert order == ["first in", "first out", "second in"]


def test_the_ingest_gate_gives_up_waiting_after_its_wait_or_the_deadline() -> None:
    gate = IngestGate(concurrency=1, queue=3, wait_s=0.2)
    with gate.turn():
        for timeout, waited in ((None, 0.2), (0.05, 0.05)):
            t0 = time.monotonic()
            with pytest.raises(ResourceExhausted) as ei, gate.turn(timeout):
                pass
            took = time.monotonic() - t0
            assert waited <= took < waited + 1.0
            assert f"no turn within {waited:.2g} s" in ei.value.message
    with gate.turn():  # free again
        pass
    unbounded = IngestGate(concurrency=0, queue=0, wait_s=0.0)
    with unbounded.turn(), unbounded.turn():  # 0: no bound
        pass


def test_concurrent_ingest_calls_beyond_the_gate_are_refused_and_lose_nothing(
        tmp_path: Path) -> None:
    run = Running(tmp_path, max_batch=10_000, rate_limit_events_per_s=0,
                  ingest_concurrency=1, ingest_queue=0)
    try:
        # built first, sent together: one call takes the turn (10k events take well over
        # the milliseconds the others need to arrive), the others find no queue
        requests = [pb.IngestEventsRequest(events=[make_event(e) for e in
                                                   events(f"gate-{i}", 10_000)])
                    for i in range(3)]
        start = threading.Barrier(3)
        results: dict[int, object] = {}

        def send(i: int) -> None:
            with grpc.insecure_channel(run.target) as ch:
                stub = recommender_pb2_grpc.RecommenderStub(ch)
                start.wait(10)
                try:
                    results[i] = stub.IngestEvents(requests[i], timeout=30).accepted
                except grpc.RpcError as exc:
                    results[i] = (exc.code(), exc.details())

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        refused = [r for r in results.values() if isinstance(r, tuple)]
        assert len(results) == 3 and refused, results
        for code, message in refused:
            assert code == EXHAUSTED
            assert message.startswith("IngestEvents: too many ingest calls in progress")
        accepted = [r for r in results.values() if not isinstance(r, tuple)]
        assert accepted and all(r == 10_000 for r in accepted), results
        # what was refused was not stored: bronze holds exactly the accepted calls' events
        run.server.ingest.flush()
        bronze = run.server.lake.read("bronze_events", columns=["event_id"])
        assert bronze.num_rows == 10_000 * len(accepted)
    finally:
        run.close()


def test_small_concurrent_ingest_calls_skip_the_gate(tmp_path: Path) -> None:
    """A shop's many small calls at once are never refused for being concurrent: with no
    queue at all, 8 threads x 25 one-event calls are all accepted."""
    run = Running(tmp_path, rate_limit_events_per_s=0, ingest_concurrency=1, ingest_queue=0,
                  ingest_gate_min_events=10)
    try:
        start = threading.Barrier(8)
        outcomes: list[object] = []

        def send(i: int) -> None:
            with grpc.insecure_channel(run.target) as ch:
                stub = recommender_pb2_grpc.RecommenderStub(ch)
                start.wait(10)
                for n in range(25):
                    req = pb.IngestEventsRequest(events=[make_event(e) for e in
                                                         events(f"small-{i}-{n}", 1)])
                    try:
                        outcomes.append(stub.IngestEvents(req, timeout=30).accepted)
                    except grpc.RpcError as exc:
                        outcomes.append(exc.code())

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes == [1] * 200
    finally:
        run.close()


def test_an_events_limit_below_the_batch_size_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_settings(env={}, overrides={"server": {"max_batch": 500,
                                                    "rate_limit_events_per_s": 200}})
    assert "server.rate_limit_events_per_s" in str(ei.value)
    assert "at least server.max_batch (500)" in str(ei.value)
    ok = load_settings(env={}, overrides={"server": {"max_batch": 500,
                                                     "rate_limit_events_per_s": 0}})
    assert ok.server.rate_limit_events_per_s == 0
