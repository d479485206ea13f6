"""Property-based fuzzing of the REAL gRPC server (127.0.0.1, port 0) with malformed requests.

What a reply may be, per RPC (anything else -- UNKNOWN, INTERNAL, UNAVAILABLE, a hang past
the deadline -- fails the property):

================  ================================================================
RPC               allowed status codes
================  ================================================================
Recommend         OK, INVALID_ARGUMENT
RecommendBatch    OK, INVALID_ARGUMENT (always for an empty batch)
SimilarItems      OK, INVALID_ARGUMENT, NOT_FOUND (unknown item, as the proto says)
IngestEvents      OK, INVALID_ARGUMENT
UpsertItems       OK, INVALID_ARGUMENT
Admin, no token   UNAUTHENTICATED (always, whatever the request)
ReloadModel       OK, INVALID_ARGUMENT, NOT_FOUND (no such bundle directory)
ModelInfo         OK
ForgetUser        OK, INVALID_ARGUMENT
================  ================================================================

RESOURCE_EXHAUSTED is allowed exactly when the serialised request is larger than the
server's `max_message_bytes` (set to 64 KiB here so huge fields cross it), and is then
required: gRPC refuses the message before any handler runs.

Beyond the status code, an OK reply must be well formed: Recommend/SimilarItems return at
most k distinct items with finite, non-increasing scores, none of the excluded ids, from
the loaded model "v1"; IngestEvents accounts for every event exactly once
(accepted + duplicates + rejected == sent, rejected indices unique and in range, nothing
rejected in an atomic request). After every example the server still reports SERVING on
both ports and gives the known answer for a sentinel user (tests/online_bundles.py: uC2,
whose vector is e2, gets C2, C3, C4). The fuzzed ids never touch the sentinel's
neighbourhood (no C items, not uC2), so that answer is known in advance.

`test_fuzz_*` (about 100 examples in all) run in `make test`; `test_fuzz_soak_*` run the
same properties with ten times more examples under `-m reliability`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import online_bundles as kb
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lake.config import EVENT_TYPES, load_settings
from online.pb import admin_pb2, admin_pb2_grpc, recommender_pb2_grpc
from online.pb import recommender_pb2 as pb
from online.server import create_server

TOKEN = "fuzz-token"
MAX_K = 50
MAX_BATCH = 100
MAX_MESSAGE_BYTES = 64 * 1024
RPC_TIMEOUT_S = 20.0
SENTINEL_USER, SENTINEL_ANSWER = "uC2", ["C2", "C3", "C4"]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

# -- strategies ----------------------------------------------------------------------------
# Each field is valid most of the time and malformed some of the time (`mostly`), so that
# requests get past validation often enough to exercise the engine, the WAL and the lake
# with odd-but-valid values (unicode, control characters, NUL, quotes) as well.
# Known ids the fuzz may use: A and B clusters, batch users of A and B, ids unknown to the
# model. Never the sentinel user or a C item (see the module docstring).
KNOWN_USERS = ["uA0", "uA1", "uB0", "uB1", "fuzz-user", "new-user"]
KNOWN_ITEMS = [*kb.cluster_items("A"), *kb.cluster_items("B"), "N1", "N2", "N3"]
RESERVED = {SENTINEL_USER, *kb.cluster_items("C")}


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy,
           bad_in_ten: int = 2) -> st.SearchStrategy:
    """`bad` about `bad_in_ten` times in ten, else `good`."""
    return st.integers(0, 9).flatmap(lambda r: bad if r >= 10 - bad_in_ten else good)


CTRL = "".join(chr(c) for c in (*range(0, 32), *range(127, 160)))  # C0, DEL, C1: invalid
INVISIBLE = "\u200b\u2028\ufeff\u202e\u00ad\u3000 "  # format characters and separators
odd_ids = st.one_of(  # valid: a visible character, at most max_id_length, no controls
    st.sampled_from(["'", "''", "\\", "%", "_", "*", "../v1", "a/b", "NULL", "' OR 1=1 --",
                     "\U0001f600", "é" * 256, "x" * 256, " padded ", "a\u202e", "\u200bb",
                     "\ufeffx"]),
    # unicode, no surrogates (protobuf strings are UTF-8), no controls; at least one letter
    st.tuples(st.text(alphabet=st.characters(exclude_categories=("Cs",),
                                             exclude_characters=CTRL), max_size=39),
              st.characters(categories=("L",))).map("".join),
    st.tuples(st.text(alphabet=INVISIBLE + "ab", max_size=9),
              st.sampled_from("ab")).map("".join),
).filter(lambda v: v.strip() and v not in RESERVED)
bad_ids = mostly(st.one_of(
    st.sampled_from(["", " ", "\t", "\n \r", "\u3000"]),  # empty or blank
    st.text(alphabet=INVISIBLE, min_size=1, max_size=6),  # nothing visible
    st.sampled_from(["\x00", "\x00uA0", "uA0\x00", "a\nb", "\x7f", "u\rA0",
                     "u\x85A0"]),  # control characters (C0, DEL, C1)
    st.integers(min_value=257, max_value=300).map(lambda n: "x" * n),  # over max_id_length
    st.integers(min_value=257, max_value=300).map(lambda n: "é" * n),
), st.integers(min_value=70_000, max_value=100_000).map(lambda n: "y" * n), 1)  # > max message
weird_text = st.one_of(odd_ids, bad_ids)
user_ids = mostly(st.one_of(st.sampled_from(KNOWN_USERS), odd_ids), bad_ids)
item_ids = mostly(st.one_of(st.sampled_from(KNOWN_ITEMS), odd_ids), bad_ids)
good_items = st.one_of(st.sampled_from(KNOWN_ITEMS), odd_ids)


def lists_of(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Lists of `good`, one in ten with a `bad` entry somewhere."""
    spoilt = st.tuples(st.lists(good, max_size=2), bad, st.lists(good, max_size=2)).map(
        lambda t: [*t[0], t[1], *t[2]])
    return mostly(st.lists(good, max_size=5), spoilt, 1)


id_lists = lists_of(good_items, bad_ids)
k_values = mostly(
    st.integers(min_value=1, max_value=MAX_K),
    st.one_of(st.sampled_from([-(2**31), -1, 0, MAX_K + 1, 2**31 - 1]),
              st.integers(min_value=-(2**31), max_value=2**31 - 1)),
)


@st.composite
def filters(draw: st.DrawFn) -> pb.Filters:
    cats = lists_of(odd_ids, bad_ids)
    f = pb.Filters(exclude_item_ids=draw(id_lists), include_categories=draw(cats),
                   exclude_categories=draw(cats))
    if (v := draw(st.sampled_from([None, True, False]))) is not None:
        f.exclude_seen = v
    if (v := draw(st.sampled_from([None, True, False]))) is not None:
        f.only_available = v
    if draw(st.integers(0, 9)) == 0:  # around max_batch ids: the list check must say so
        f.exclude_item_ids.extend(["A1"] * draw(st.integers(MAX_BATCH - 2, MAX_BATCH + 2)))
    return f


NOW_S = int(datetime.now(UTC).timestamp())
good_ts = st.integers(min_value=NOW_S - 86400 * 400, max_value=NOW_S + 3600)
bad_ts = st.one_of(
    st.sampled_from([
        0, -1, -(2**40), 2**40, -62135596800, -62135596801,  # year 1, and one second before
        253402300799, 253402300800,  # 9999-12-31T23:59:59, and one second after
        788918400 - 1, 788918400,  # around the 1995-01-01 floor
        NOW_S + 23 * 3600, NOW_S + 25 * 3600,  # around the now + 1 day ceiling
        -(2**63), 2**63 - 1,
    ]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
ts_nanos = mostly(st.integers(0, 999_999_999),
                  st.sampled_from([-1, 1_000_000_000, -(2**31), 2**31 - 1]), 1)
values = mostly(
    st.one_of(st.none(), st.sampled_from([0.0, -0.0, 1.0, 10.0, 1e308, -1e308, 5e-324]),
              st.floats(allow_nan=False, allow_infinity=False)),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -1.0, 10.000001]),
)
event_types = mostly(st.sampled_from(EVENT_TYPES), st.one_of(
    weird_text, st.sampled_from(["View", " view", "view ", "PURCHASE", "rating\x00", "like"])))
_ids = count()


def fresh_id(tag: str) -> str:
    return f"{tag}-{time.monotonic_ns()}-{next(_ids)}"


@st.composite
def events(draw: st.DrawFn, ids: list[str]) -> pb.Event:
    """An event with any field possibly malformed; ids drawn from `ids` repeat on purpose."""
    e = pb.Event(
        event_id=draw(mostly(st.one_of(st.builds(fresh_id, st.just("ev")), st.sampled_from(ids),
                                       odd_ids), bad_ids)),
        user_id=draw(user_ids), item_id=draw(item_ids), event_type=draw(event_types),
        session_id=draw(st.one_of(st.just(""), odd_ids, bad_ids)),
        properties=draw(st.dictionaries(st.text(max_size=10), mostly(odd_ids, weird_text),
                                        max_size=3)),
    )
    if (v := draw(values)) is not None:
        e.value = v
    if draw(st.integers(0, 19)):  # mostly present; unset means "required field missing"
        e.ts.CopyFrom(Timestamp(seconds=draw(mostly(good_ts, bad_ts)), nanos=draw(ts_nanos)))
    return e


def valid_event(i: int) -> pb.Event:
    e = pb.Event(event_id=fresh_id(f"bulk{i}"), user_id=f"bulk-user-{i % 7}",
                 item_id=KNOWN_ITEMS[i % len(KNOWN_ITEMS)], event_type=EVENT_TYPES[i % 4])
    e.ts.FromDatetime(datetime.now(UTC) - timedelta(minutes=i))
    return e


@st.composite
def ingest_requests(draw: st.DrawFn) -> pb.IngestEventsRequest:
    ids = ["dup-a", "dup-b", fresh_id("dup")]  # repeated within and across requests
    fuzzed = draw(st.lists(events(ids), max_size=6))
    # Batches up to and beyond max_batch: the bulk is valid (and cheap to draw), the fuzzed
    # events sit at random positions in it.
    n_bulk = draw(mostly(st.integers(0, 10), st.one_of(
        st.integers(MAX_BATCH - 7, MAX_BATCH + 3), st.integers(0, 3 * MAX_BATCH))))
    batch = [valid_event(i) for i in range(n_bulk)]
    for e in fuzzed:
        batch.insert(draw(st.integers(0, len(batch))), e)
    if batch and draw(st.integers(0, 9)) == 0:  # the same event twice in one request
        batch.append(batch[draw(st.integers(0, len(batch) - 1))])
    return pb.IngestEventsRequest(events=batch, atomic=draw(st.integers(0, 3)) == 0)


@st.composite
def upsert_requests(draw: st.DrawFn) -> pb.UpsertItemsRequest:
    items = []
    for _ in range(draw(mostly(st.integers(1, 5), st.just(0), 1))):  # 0: "items" is empty
        it = pb.Item(item_id=draw(mostly(good_items, bad_ids, 1)))
        if draw(st.booleans()):
            it.category = draw(mostly(odd_ids, bad_ids, 1))
        if draw(st.booleans()):
            it.price = draw(mostly(st.floats(min_value=0, allow_infinity=False),
                                   st.sampled_from([math.nan, math.inf, -math.inf, -1.0,
                                                    -5e-324]), 1))
        if draw(st.booleans()):
            it.available = draw(st.booleans())
        if draw(st.booleans()):
            it.title = draw(mostly(st.one_of(st.just(""), odd_ids), bad_ids, 1))  # free text
        items.append(it)
    if items and draw(st.integers(0, 9)) == 0:  # a duplicate item_id
        items.append(pb.Item(item_id=items[0].item_id))
    if draw(st.integers(0, 9)) == 0:  # around max_batch (unique, valid ids)
        items += [pb.Item(item_id=f"N{i}") for i in range(MAX_BATCH + draw(st.integers(-2, 3)))]
    return pb.UpsertItemsRequest(items=items)


metadata_values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                          max_size=40)
bad_metadata = st.one_of(
    st.just(()),
    metadata_values.map(lambda v: (("authorization", v),)),
    metadata_values.map(lambda v: (("authorization", f"Bearer {v}"),)),
    st.sampled_from([(("authorization", TOKEN),), (("authorization", f"bearer {TOKEN}"),),
                     (("authorization", f"Bearer {TOKEN}x"),), (("x-token", f"Bearer {TOKEN}"),),
                     (("authorization", f"Bearer {TOKEN[:-1]}"),)]),
)
reload_versions = st.one_of(st.just("v1"), weird_text)


# -- the server ----------------------------------------------------------------------------
class Server:
    """A real server on 127.0.0.1 (ports 0) serving the known bundle v1."""

    def __init__(self, tmp: Path) -> None:
        self.settings = load_settings(env={}, overrides={
            "lake": {"root": str(tmp / "lake")},
            "model": {"dir": str(tmp / "models")},
            "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                       "admin_token": TOKEN, "wal_dir": str(tmp / "wal"),
                       "flush_interval_s": 0.2, "max_batch": MAX_BATCH, "max_k": MAX_K,
                       "max_message_bytes": MAX_MESSAGE_BYTES, "workers": 4},
        })
        kb.build(Path(self.settings.model.dir), "v1")
        self.server, ports = create_server(self.settings, metrics=False)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        self.admin_channel = grpc.insecure_channel(f"127.0.0.1:{ports['admin']}")
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.admin_channel)
        self.calls: dict[str, dict[str, int]] = {}
        self.events = {"sent": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
        # event_id -> users it was acknowledged with (accepted or duplicate); forgotten users
        self.acked: dict[str, set[str]] = {}
        self.forgotten: set[str] = set()

    def call(self, method: Callable[..., Any], request: Any,
             **kw: Any) -> tuple[grpc.StatusCode, Any, str]:
        name = method._method.decode().rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        try:
            out = OK, method(request, timeout=RPC_TIMEOUT_S, **kw), ""
        except grpc.RpcError as exc:
            out = exc.code(), None, exc.details() or ""
        codes = self.calls.setdefault(name, {})
        key = out[0].name
        if out[0] == INVALID:  # which field: "events[3].ts: ..." -> "events.ts"
            key += "(" + re.sub(r"\[\d+\]", "", out[2].split(":", 1)[0]) + ")"
        codes[key] = codes.get(key, 0) + 1
        return out

    def close(self) -> None:
        self.channel.close()
        self.admin_channel.close()
        self.server.stop(grace=1)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("fuzz"))
    yield s
    print(f"\nfuzz replies by RPC and status: {s.calls}\nevents in OK ingest replies: {s.events}")
    s.close()


def assert_allowed(code: grpc.StatusCode, details: str, request: Any,
                   allowed: set[grpc.StatusCode]) -> None:
    size = request.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        assert code == TOO_BIG, (code, details, size)
        return
    assert code in allowed, (code, details, size)
    if code == INVALID:
        # the message names the field first ("k: must be ...", "events[3].ts: ...")
        assert details and details.split(":", 1)[0].strip(), details


def assert_healthy(s: Server) -> None:
    for ch in (s.channel, s.admin_channel):
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=RPC_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    resp = s.stub.Recommend(pb.RecommendRequest(user_id=SENTINEL_USER, k=3), timeout=RPC_TIMEOUT_S)
    assert [i.item_id for i in resp.items] == SENTINEL_ANSWER
    assert resp.model_version == "v1" and resp.strategy == pb.STRATEGY_PERSONALISED


def assert_acknowledged_events_in_bronze(s: Server) -> None:
    """Every acknowledged event reaches bronze once; nothing else does; the flusher never
    failed (a poison event would be acknowledged, then block every later flush)."""
    ingest = s.server.ingest
    ingest.flush()
    stats = ingest.stats()
    assert (stats["flush_errors"], stats["last_flush_error"]) == (0, None)
    assert stats["pending_events"] == 0
    bronze = s.server.lake.read("bronze_events", columns=["event_id", "user_id"])
    ids = bronze.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)), "an event_id is in bronze twice"
    assert set(ids) <= set(s.acked), "bronze holds an event that was never acknowledged"
    # A forgotten user's rows are deleted: only ids never sent for a forgotten user count.
    expected = {e for e, users in s.acked.items() if not users & s.forgotten}
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} acknowledged event(s) missing, e.g. {sorted(missing)[:3]}"


def assert_scored(resp: Any, k: int, excluded: set[str]) -> None:
    got = [i.item_id for i in resp.items]
    scores = [i.score for i in resp.items]
    assert resp.model_version == "v1"
    assert len(got) <= k and len(set(got)) == len(got), got
    assert not set(got) & excluded, (got, excluded)
    assert all(math.isfinite(x) for x in scores), scores
    assert scores == sorted(scores, reverse=True), scores


# -- properties ----------------------------------------------------------------------------
def prop_recommend(s: Server, user_id: str, k: int, f: pb.Filters, ctx: list[str],
                   explain: bool) -> None:
    req = pb.RecommendRequest(user_id=user_id, k=k, filters=f, context_item_ids=ctx,
                              explain=explain)
    code, resp, details = s.call(s.stub.Recommend, req)
    assert_allowed(code, details, req, {OK, INVALID})
    if code == OK:
        assert_scored(resp, k, set(f.exclude_item_ids))
    assert_healthy(s)


def prop_recommend_batch(s: Server, reqs: list[pb.RecommendRequest]) -> None:
    req = pb.RecommendBatchRequest(requests=reqs)
    code, resp, details = s.call(s.stub.RecommendBatch, req)
    assert_allowed(code, details, req, {OK, INVALID})
    if not reqs:
        assert code == INVALID, code
    if code == OK:
        assert len(resp.responses) == len(reqs)
        for r, one in zip(reqs, resp.responses, strict=True):
            assert_scored(one, r.k, set(r.filters.exclude_item_ids))
    assert_healthy(s)


def prop_similar(s: Server, item_id: str, k: int, f: pb.Filters) -> None:
    req = pb.SimilarItemsRequest(item_id=item_id, k=k, filters=f)
    code, resp, details = s.call(s.stub.SimilarItems, req)
    assert_allowed(code, details, req, {OK, INVALID, NOT_FOUND})
    if code == OK:
        assert_scored(resp, k, set(f.exclude_item_ids) | {item_id})
    assert_healthy(s)


def prop_ingest(s: Server, req: pb.IngestEventsRequest) -> None:
    code, resp, details = s.call(s.stub.IngestEvents, req)
    assert_allowed(code, details, req, {OK, INVALID})
    n = len(req.events)
    if n == 0 or n > MAX_BATCH:
        assert code in (INVALID, TOO_BIG), (code, n)
    if code == OK:
        s.events["sent"] += n
        s.events["accepted"] += resp.accepted
        s.events["duplicates"] += resp.duplicates
        s.events["rejected"] += len(resp.rejected)
        rejected = [r.index for r in resp.rejected]
        assert resp.accepted + resp.duplicates + len(rejected) == n, (resp, n)
        assert len(set(rejected)) == len(rejected) and all(0 <= i < n for i in rejected)
        fields = pb.Event.DESCRIPTOR.fields_by_name
        assert all(any(f in r.reason for f in fields) for r in resp.rejected), resp.rejected
        if req.atomic:
            assert not rejected
        for i, e in enumerate(req.events):
            if i not in rejected:
                s.acked.setdefault(e.event_id, set()).add(e.user_id)
    assert_healthy(s)


def prop_upsert(s: Server, req: pb.UpsertItemsRequest) -> None:
    code, resp, details = s.call(s.stub.UpsertItems, req)
    assert_allowed(code, details, req, {OK, INVALID})
    if code == OK:
        assert resp.upserted == len(req.items)
    assert_healthy(s)


def prop_admin(s: Server, which: int, text: str, md: tuple, with_token: bool) -> None:
    reqs = [(s.admin.ReloadModel, admin_pb2.ReloadModelRequest(version=text), {OK, INVALID,
                                                                               NOT_FOUND}),
            (s.admin.ReloadModel, admin_pb2.ReloadModelRequest(), {OK}),
            (s.admin.ModelInfo, admin_pb2.ModelInfoRequest(), {OK}),
            (s.admin.ForgetUser, admin_pb2.ForgetUserRequest(user_id=text), {OK, INVALID})]
    method, req, allowed = reqs[which]
    metadata = (("authorization", f"Bearer {TOKEN}"),) if with_token else md
    code, resp, details = s.call(method, req, metadata=metadata)
    assert_allowed(code, details, req, allowed if with_token else {UNAUTH})
    if code == OK and method is s.admin.ReloadModel:
        assert resp.model_version == "v1" and not resp.changed
    if code == OK and method is s.admin.ForgetUser:
        s.forgotten.add(text)
    assert_healthy(s)


PROPS: dict[str, tuple[Callable[..., None], dict[str, Any], int]] = {
    # name: (property, strategies, examples in the fast variant)
    "recommend": (prop_recommend, dict(user_id=user_ids, k=k_values, f=filters(), ctx=id_lists,
                                       explain=st.booleans()), 25),
    "recommend_batch": (prop_recommend_batch, dict(reqs=st.lists(st.builds(
        pb.RecommendRequest, user_id=user_ids, k=k_values, filters=filters(),
        context_item_ids=id_lists, explain=st.booleans()), max_size=5)), 15),
    "similar": (prop_similar, dict(item_id=item_ids, k=k_values, f=filters()), 15),
    "ingest": (prop_ingest, dict(req=ingest_requests()), 25),
    "upsert": (prop_upsert, dict(req=upsert_requests()), 15),
    "admin": (prop_admin, dict(which=st.integers(0, 3), text=reload_versions, md=bad_metadata,
                               with_token=st.booleans()), 20),
}


def fuzz_test(name: str, scale: int) -> Callable[[Server], None]:
    prop, strategies, n = PROPS[name]

    @settings(max_examples=n * scale, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(**strategies)
    def examples(srv: Server, **kw: Any) -> None:
        prop(srv, **kw)

    def test(srv: Server) -> None:
        examples(srv)
        assert_acknowledged_events_in_bronze(srv)

    test.__name__ = f"test_fuzz_{name}"
    return test


test_fuzz_recommend = fuzz_test("recommend", 1)
test_fuzz_recommend_batch = fuzz_test("recommend_batch", 1)
test_fuzz_similar = fuzz_test("similar", 1)
test_fuzz_ingest = fuzz_test("ingest", 1)
test_fuzz_upsert = fuzz_test("upsert", 1)
test_fuzz_admin = fuzz_test("admin", 1)

SOAK = 10
test_fuzz_soak_recommend = pytest.mark.reliability(fuzz_test("recommend", SOAK))
test_fuzz_soak_recommend_batch = pytest.mark.reliability(fuzz_test("recommend_batch", SOAK))
test_fuzz_soak_similar = pytest.mark.reliability(fuzz_test("similar", SOAK))
test_fuzz_soak_ingest = pytest.mark.reliability(fuzz_test("ingest", SOAK))
test_fuzz_soak_upsert = pytest.mark.reliability(fuzz_test("upsert", SOAK))
test_fuzz_soak_admin = pytest.mark.reliability(fuzz_test("admin", SOAK))
