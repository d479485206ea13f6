"""End-to-end tests of the gRPC online layer: a real server on 127.0.0.1 (port 0), a real
bundle with known factors (tests/online_bundles.py), real FAISS, the real ingest pipeline."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import online_bundles as kb
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lambdarec_client import Client
from lambdarec_client.cli import main as cli_main

from lake.config import load_settings
from lake.training_cut import TrainingCut
from online.pb import admin_pb2, admin_pb2_grpc
from online.pb import recommender_pb2 as pb
from online.server import create_server

TOKEN = "s3cret-token"
A, B, C = (kb.cluster_items(c) for c in "ABC")


def make_settings(tmp: Path, **server: object):
    srv = {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
           "admin_token": TOKEN, "wal_dir": str(tmp / "wal"), "flush_interval_s": 0.2,
           "max_batch": 100, "max_k": 50, "new_item_min_interactions": 3, "workers": 8}
    srv.update(server)
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")},
        "model": {"dir": str(tmp / "models")},
        "server": srv,
    })


class Running:
    def __init__(self, tmp: Path, *, as_of: str | None = None, **server: object) -> None:
        self.settings = make_settings(tmp, **server)
        self.models = Path(self.settings.model.dir)
        if not (self.models / "v1").exists():
            kb.build(self.models, "v1", as_of=as_of)
        self.server, self.ports = create_server(self.settings)
        self.server.start()
        self.target = f"127.0.0.1:{self.ports['grpc']}"
        self.admin_target = f"127.0.0.1:{self.ports['admin']}"
        self.client = Client(self.target, self.admin_target, token=TOKEN, timeout=10)

    def close(self) -> None:
        self.client.close()
        self.server.stop(grace=1)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    r = Running(tmp_path_factory.mktemp("online"))
    yield r
    r.close()


def ids(resp) -> list[str]:
    return [i.item_id for i in resp.items]


def ev(user: str, item: str, etype: str = "view", **kw) -> dict:
    return {"event_id": f"{user}-{item}-{etype}-{time.monotonic_ns()}", "user_id": user,
            "item_id": item, "event_type": etype, "ts": datetime.now(UTC), **kw}


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


# -- Recommend ---------------------------------------------------------------------------
def test_known_user_gets_own_cluster_without_seen_items(srv: Running) -> None:
    resp = srv.client.recommend("uA0", k=5)
    assert resp.model_version == "v1"
    assert resp.strategy == pb.STRATEGY_PERSONALISED
    assert ids(resp) == ["A2", "A3", "A4", "A5", "A6"]  # A0, A1 seen; norms decrease with i
    scores = [i.score for i in resp.items]
    assert scores == sorted(scores, reverse=True)
    with_seen = srv.client.recommend("uA0", k=2, exclude_seen=False)
    assert ids(with_seen) == ["A0", "A1"]


def test_new_user_first_events_move_answer_to_their_neighbourhood(srv: Running) -> None:
    before = srv.client.recommend("new-user-1", k=3)
    assert before.strategy == pb.STRATEGY_FALLBACK
    out = srv.client.ingest([ev("new-user-1", "C4", "purchase")])
    assert (out.accepted, out.duplicates, list(out.rejected)) == (1, 0, [])
    after = srv.client.recommend("new-user-1", k=4)  # read-your-writes: same call sequence
    assert after.strategy == pb.STRATEGY_PERSONALISED
    assert ids(after) == ["C0", "C1", "C2", "C3"]  # C4 itself is seen
    # a known user's event pulls them towards the new cluster
    srv.client.ingest([ev("uB2", "A5", "purchase"), ev("uB2", "A6", "purchase"),
                       ev("uB2", "A7", "purchase")])
    top = ids(srv.client.recommend("uB2", k=3))
    assert set(top) <= set(A) and not {"A5", "A6", "A7"} & set(top)


def test_duplicate_event_ids_are_acknowledged_once(srv: Running) -> None:
    e = ev("dup-user", "B5")
    first = srv.client.ingest([e])
    again = srv.client.ingest([e])
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 1)


def test_context_items_steer_one_request_only(srv: Running) -> None:
    steered = srv.client.recommend("uA1", k=3, context_item_ids=["C0", "C1", "C2"])
    assert ids(steered) == ["C3", "C4", "C5"]  # context items count as seen
    assert ids(srv.client.recommend("uA1", k=3)) == ["A2", "A3", "A4"]


def test_filters_categories_availability_and_excluded_ids(srv: Running) -> None:
    up = srv.client.upsert_items([
        {"item_id": "B2", "category": "shoes", "available": False},
        {"item_id": "B3", "category": "shoes", "price": 10.0},
        {"item_id": "B4", "category": "hats"},
        {"item_id": "B6", "category": "shoes", "title": "Red shoe"},
    ])
    assert up.upserted == 4
    assert ids(srv.client.recommend("uB0", k=3)) == ["B3", "B4", "B5"]  # B2 unavailable
    assert ids(srv.client.recommend("uB0", k=1, only_available=False)) == ["B2"]
    assert ids(srv.client.recommend("uB0", k=5, include_categories=["shoes"])) == ["B3", "B6"]
    assert ids(srv.client.recommend("uB0", k=3, exclude_categories=["shoes"])) == \
        ["B4", "B5", "B7"]
    assert ids(srv.client.recommend("uB0", k=3, exclude_item_ids=["B3", "B5"])) == \
        ["B4", "B6", "B7"]
    # over-fetch grows until the filters are satisfied (the only hat is far down the list)
    assert ids(srv.client.recommend("uA2", k=2, include_categories=["hats"])) == ["B4"]


def test_recommend_batch_answers_each_request_as_recommend_does(srv: Running) -> None:
    c = srv.client
    out = c.recommend_batch([
        {"user_id": "uA0", "k": 3},
        {"user_id": "uC1", "k": 2, "explain": True},
        {"user_id": "uA1", "k": 3, "context_item_ids": ["C0", "C1", "C2"]},
        {"user_id": "never-seen-batch-user", "k": 2},
        {"user_id": "uB1", "k": 2, "exclude_seen": False},
    ])
    got = [ids(r) for r in out.responses]
    assert got[:3] == [["A2", "A3", "A4"], ["C2", "C3"], ["C3", "C4", "C5"]]
    assert got[4] == ["B0", "B1"]
    assert set(out.responses[1].items[0].because) <= {"C0", "C1"}
    assert [r.strategy for r in out.responses] == [pb.STRATEGY_PERSONALISED] * 3 + \
        [pb.STRATEGY_FALLBACK, pb.STRATEGY_PERSONALISED]
    assert all(r.model_version == "v1" for r in out.responses)
    # each answer is exactly the unary answer
    for req, resp in ((("uA0", 3), out.responses[0]),
                      (("never-seen-batch-user", 2), out.responses[3])):
        single = c.recommend(*req)
        assert [(i.item_id, i.score) for i in single.items] == \
            [(i.item_id, i.score) for i in resp.items]
    # one bad request fails the whole call, naming it; an empty batch is refused
    code, msg = code_of(lambda: c.recommend_batch([{"user_id": "uA0"},
                                                   {"user_id": "uA0", "k": 0}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("requests[1].k"), msg
    code, msg = code_of(lambda: c.recommend_batch([{"user_id": "uA0", "include_categories":
                                                    [""]}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and \
        msg.startswith("requests[0].filters.include_categories[0]"), msg
    code, msg = code_of(lambda: c.recommend_batch([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("requests"), msg


def test_explain_names_the_contributing_seen_item(srv: Running) -> None:
    resp = srv.client.recommend("uC1", k=2, explain=True)
    assert ids(resp) == ["C2", "C3"]
    for item in resp.items:
        assert item.because and set(item.because) <= {"C0", "C1"}
    assert all(not i.because for i in srv.client.recommend("uC1", k=2).items)


def test_similar_items_are_cluster_mates(srv: Running) -> None:
    resp = srv.client.similar("A3", k=4)
    assert ids(resp) == ["A0", "A1", "A2", "A4"]
    assert resp.model_version == "v1"
    code, msg = code_of(lambda: srv.client.similar("nope", k=3))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg


def test_popularity_fallback_for_unknown_users(tmp_path: Path) -> None:
    r = Running(tmp_path)  # its own server: no real-time counts from other tests
    try:
        c = r.client
        resp = c.recommend("never-seen-user", k=3)
        assert resp.strategy == pb.STRATEGY_FALLBACK and resp.model_version == "v1"
        assert ids(resp) == kb.TOP_POPULAR
        assert ids(c.recommend("never-seen-user", k=2, exclude_item_ids=["B3"])) == ["A7", "C1"]
        c.upsert_items([{"item_id": "A7", "available": False}])
        assert ids(c.recommend("never-seen-user", k=2)) == ["B3", "C1"]
        # real-time counts (decayed) blend in: a burst of purchases lifts C5 to the top
        c.ingest([ev(f"shopper{i}", "C5", "purchase") for i in range(5)])
        top = c.recommend("another-stranger", k=3)
        assert top.strategy == pb.STRATEGY_FALLBACK
        assert ids(top) == ["C5", "B3", "C1"]
        # the shoppers themselves are personalised now, and never get C5 again
        assert ids(c.recommend("shopper0", k=1)) == ["C0"]
    finally:
        r.close()


def test_new_item_is_folded_in_and_recommended(srv: Running) -> None:
    info = srv.client.model_info()
    before = info.online_items
    code, _ = code_of(lambda: srv.client.similar("NEW-B", k=3))
    assert code == grpc.StatusCode.NOT_FOUND
    srv.client.upsert_items([{"item_id": "NEW-B", "category": "fresh"}])
    srv.client.ingest([ev("uB0", "NEW-B", "purchase"), ev("uB1", "NEW-B", "purchase")])
    code, _ = code_of(lambda: srv.client.similar("NEW-B", k=3))  # 2 < 3 interactions
    assert code == grpc.StatusCode.NOT_FOUND
    srv.client.ingest([ev("new-b-fan", "B0", "purchase")])  # a user with a vector...
    srv.client.ingest([ev("new-b-fan", "NEW-B", "purchase")])  # ...is the third
    assert srv.client.model_info().online_items == before + 1
    assert set(ids(srv.client.similar("NEW-B", k=3))) <= set(B)
    # a B user who has not touched it gets it, and nobody else in the catalogue is "fresh"
    rec = srv.client.recommend("uB2", k=5, include_categories=["fresh"])
    assert ids(rec) == ["NEW-B"]
    assert rec.items[0].score > 0


def test_forget_user_erases_online_state(srv: Running) -> None:
    srv.client.ingest([ev("forget-me", "A3", "purchase")])
    assert srv.client.recommend("forget-me", k=2).strategy == pb.STRATEGY_PERSONALISED
    out = srv.client.forget_user("forget-me")
    assert out.online_state_removed
    assert isinstance(json.loads(out.lake_json), dict)
    assert srv.client.recommend("forget-me", k=2).strategy == pb.STRATEGY_FALLBACK
    srv.client.forget_user("uC2")  # a batch user: their batch vector is no longer served
    assert srv.client.recommend("uC2", k=2).strategy == pb.STRATEGY_FALLBACK


# -- validation ----------------------------------------------------------------------------
def test_malformed_requests_are_invalid_argument_naming_the_field(srv: Running) -> None:
    c = srv.client
    long_id = "x" * 300
    cases = {
        "k": lambda: c.recommend("uA0", k=0),
        "k:": lambda: c.recommend("uA0", k=51),
        "user_id": lambda: c.recommend("", k=3),
        "user_id:": lambda: c.recommend(long_id, k=3),
        "filters.exclude_item_ids[0]": lambda: c.recommend("uA0", k=3, exclude_item_ids=[""]),
        "filters.include_categories[1]": lambda: c.recommend(
            "uA0", k=3, include_categories=["a", long_id]),
        "context_item_ids[0]": lambda: c.recommend("uA0", k=3, context_item_ids=[" "]),
        "item_id": lambda: c.similar("", k=3),
        "k ": lambda: c.similar("A1", k=-1),
        "events": lambda: c.ingest([]),
        "events:": lambda: c.ingest([ev("u", "i")] * 101),
        "events[1].event_type": lambda: c.ingest([ev("u", "A1"), ev("u", "A1", "teleport")],
                                                 atomic=True),
        "events[0].ts": lambda: c.ingest(
            [ev("u", "A1", ts=datetime.now(UTC) + timedelta(days=30))], atomic=True),
        "events[0].user_id": lambda: c.ingest([ev("", "A1")], atomic=True),
        "items": lambda: c.upsert_items([]),
        "items[1].item_id": lambda: c.upsert_items([{"item_id": "q"}, {"item_id": "q"}]),
        "items[0].price": lambda: c.upsert_items([{"item_id": "q", "price": -1.0}]),
        "items[0].category": lambda: c.upsert_items([{"item_id": "q", "category": ""}]),
        # payload limits: control characters in ids, absurd values, huge payloads
        "user_id::": lambda: c.recommend("\x00", k=3),
        "item_id:": lambda: c.similar("A1\nA2", k=3),
        "events[0].item_id": lambda: c.ingest([{**ev("u", "x"), "item_id": "a\rb"}],
                                              atomic=True),
        "events[0].value": lambda: c.ingest([ev("u", "A1", "purchase", value=1e308)],
                                            atomic=True),
        "events[0].properties": lambda: c.ingest(
            [ev("u", "A1", properties={f"k{i}": "v" for i in range(10_000)})], atomic=True),
        "events[0].properties:": lambda: c.ingest(
            [ev("u", "A1", properties={"blob": "z" * 5000})], atomic=True),
        "items[0].title": lambda: c.upsert_items([{"item_id": "q", "title": "t" * 2000}]),
        "items[0].category:": lambda: c.upsert_items([{"item_id": "q", "category": "a\x00"}]),
        # ids of invisible characters only, C1 controls, controls in titles and properties
        "user_id:::": lambda: c.recommend("\u200b", k=3),
        "item_id::": lambda: c.similar("\ufeff\u200d", k=3),
        "events[0].user_id:": lambda: c.ingest([{**ev("u", "A1"), "user_id": "\u200b\u2060"}],
                                               atomic=True),
        "events[0].item_id:": lambda: c.ingest([{**ev("u", "x"), "item_id": "A\x851"}],
                                               atomic=True),
        "events[0].properties::": lambda: c.ingest(
            [ev("u", "A1", properties={"note": "bell\x07"})], atomic=True),
        "items[0].title:": lambda: c.upsert_items([{"item_id": "q", "title": "Mug\x1b[31m"}]),
    }
    for field, call in cases.items():
        code, msg = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, msg)
        assert msg.startswith(field.rstrip(": ")), (field, msg)
    admin = admin_pb2_grpc.AdminStub(c.admin_channel)
    md = [("authorization", f"Bearer {TOKEN}")]
    code, msg = code_of(lambda: admin.ForgetUser(admin_pb2.ForgetUserRequest(), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("user_id")
    # a name the file system would choke on (found by the fuzz soak) is refused up front
    for bad in ("../etc", "é" * 256, "x" * 300, ".hidden", "v1\x00"):
        code, msg = code_of(lambda bad=bad: c.reload(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("version"), (bad, msg)
    # non-atomic ingest: good events stored, bad ones listed with the field named
    out = c.ingest([ev("partial", "A1"), ev("partial", "A2", "teleport"),
                    {**ev("partial", "A3"), "ts": datetime(1980, 1, 1, tzinfo=UTC)}])
    assert out.accepted == 1
    assert [r.index for r in out.rejected] == [1, 2]
    assert "event_type" in out.rejected[0].reason and "ts" in out.rejected[1].reason
    missing_ts = pb.Event(event_id="no-ts", user_id="u", item_id="A1", event_type="view")
    out = c.ingest([missing_ts])
    assert out.accepted == 0 and "ts" in out.rejected[0].reason
    assert c.health() == "SERVING"
    assert ids(c.recommend("uA0", k=1)) == ["A2"]


def test_deadline_exceeded(srv: Running) -> None:
    codes = set()
    for _ in range(5):  # a deadline already gone by the time the call starts
        try:
            srv.client.recommend("uA0", k=3, timeout=1e-6)
        except grpc.RpcError as exc:
            codes.add(exc.code())
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert srv.client.health() == "SERVING"


def test_message_size_limit_is_enforced(tmp_path: Path) -> None:
    r = Running(tmp_path, max_message_bytes=4096)
    try:
        code, _ = code_of(lambda: r.client.recommend("uA0", k=3, exclude_item_ids=["x" * 200] * 40))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ids(r.client.recommend("uA0", k=1)) == ["A2"]
    finally:
        r.close()


def test_recommend_batch_that_cannot_fit_is_refused_up_front(tmp_path: Path) -> None:
    r = Running(tmp_path, max_message_bytes=16 * 1024)
    try:
        stub = r.client.stub
        too_big = pb.RecommendBatchRequest(requests=[
            pb.RecommendRequest(user_id=f"nobody{i}", k=30) for i in range(100)])
        code, msg = code_of(lambda: stub.RecommendBatch(too_big, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert msg.startswith("requests: ") and "server.max_message_bytes 16384" in msg
        fits = pb.RecommendBatchRequest(requests=[
            pb.RecommendRequest(user_id=f"nobody{i}", k=5) for i in range(10)])
        assert [len(a.items) for a in stub.RecommendBatch(fits, timeout=10).responses] == [5] * 10
    finally:
        r.close()


# -- admin, health, reflection, metrics ----------------------------------------------------
def test_admin_requires_bearer_token(srv: Running) -> None:
    stub = admin_pb2_grpc.AdminStub(srv.client.admin_channel)
    req = admin_pb2.ModelInfoRequest()
    for md in ([], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
        code, msg = code_of(lambda md=md: stub.ModelInfo(req, metadata=md, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED, md
    code, _ = code_of(lambda: stub.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    info = srv.client.model_info()
    assert (info.model_version, info.dim, info.n_items, info.n_users) == ("v1", kb.DIM, 30, 9)
    assert json.loads(info.metrics_json) == {"ndcg@10": 0.5}
    assert {k: m.value for k, m in info.metrics.items()} == {"ndcg@10": 0.5}  # structured
    assert not info.metrics["ndcg@10"].HasField("interval_low") and not info.baselines
    # the admin service is not on the public port
    public_admin = admin_pb2_grpc.AdminStub(srv.client.channel)
    code, _ = code_of(lambda: public_admin.ModelInfo(req, metadata=[("authorization",
                                                                     f"Bearer {TOKEN}")]))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection_on_both_ports(srv: Running) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    for target, service in ((srv.target, "lambdarec.v1.Recommender"),
                            (srv.admin_target, "lambdarec.v1.Admin")):
        with grpc.insecure_channel(target) as ch:
            h = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                resp = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            db = ProtoReflectionDescriptorDatabase(ch)
            services = set(db.get_services())
            assert {service, "grpc.health.v1.Health"} <= services
            fd = db.FindFileContainingSymbol(service)
            assert fd.package == "lambdarec.v1"


def test_metrics_endpoint(srv: Running) -> None:
    srv.client.recommend("uA0", k=2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['metrics']}/metrics",
                                  timeout=5).read().decode()
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="Recommend",'
            'grpc_service="lambdarec.v1.Recommender",grpc_type="unary"}') in body
    assert ('grpc_server_handling_seconds_bucket{grpc_method="Recommend",'
            'grpc_service="lambdarec.v1.Recommender",grpc_type="unary",le="0.001"}') in body
    assert "process_resident_memory_bytes" in body
    assert 'lambdarec_model_info{version="v1"} 1.0' in body
    assert "lambdarec_ingest_pending_events" in body


def test_http_health_follows_serving_and_a_stop_drains_before_closing(
        tmp_path: Path) -> None:
    """`/healthz` on the metrics port: 200 while serving; on stop 503 at once while calls
    are still answered for `server.drain_s`, then the port closes."""
    r = Running(tmp_path, drain_s=1.5)
    url = f"http://127.0.0.1:{r.ports['metrics']}/healthz"

    def health() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    try:
        assert health() == (200, "SERVING\n")
        stopper = threading.Thread(target=r.server.stop, kwargs={"grace": 1})
        t0 = time.monotonic()
        stopper.start()
        deadline = t0 + 1.0
        while health()[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health() == (503, "NOT_SERVING\n")
        assert time.monotonic() - t0 < 1.0
        # NOT_SERVING, yet still answering: calls in the drain window succeed
        assert ids(r.client.recommend("uA0", k=2))
        stopper.join(30)
        assert time.monotonic() - t0 >= 1.5
        with pytest.raises(grpc.RpcError):
            r.client.recommend("uA0", k=2, timeout=1)
    finally:
        r.client.close()
        r.server.stop(grace=1)


def test_client_cli_prints_json(srv: Running, capsys: pytest.CaptureFixture[str],
                                tmp_path: Path) -> None:
    base = ["--target", srv.target, "--admin-target", srv.admin_target, "--token", TOKEN]
    assert cli_main([*base, "recommend", "uA0", "-k", "2", "--explain"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["item_id"] for i in out["items"]] == ["A2", "A3"]
    assert out["strategy"] == "STRATEGY_PERSONALISED" and out["items"][0]["because"]
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"user_id": "uA0", "k": 1}\n{"user_id": "uC1", "k": 1}\n')
    assert cli_main([*base, "recommend-batch", "--file", str(batch)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["items"][0]["item_id"] for r in out["responses"]] == ["A2", "C2"]
    assert cli_main([*base, "similar", "C0", "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["item_id"] == "C1"
    assert cli_main([*base, "ingest", "--user", "cli-user", "--item", "A4"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 1
    bad = tmp_path / "events.jsonl"
    bad.write_text('{"user_id": "cli-user", "item_id": "A4", "event_type": "teleport"}\n')
    assert cli_main([*base, "ingest", "--file", str(bad)]) == 1  # was 0: lost events unnoticed
    printed = capsys.readouterr()
    assert [r["index"] for r in json.loads(printed.out)["rejected"]] == [0]
    assert printed.err == 'error: 1 event(s) rejected (see "rejected" above)\n'
    assert cli_main([*base, "upsert-items", "--item", "A9", "--category", "cli"]) == 0
    assert json.loads(capsys.readouterr().out)["upserted"] == 1
    assert cli_main([*base, "health"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "SERVING"}
    assert cli_main([*base, "model-info"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "v1"
    assert cli_main([*base, "recommend", "uA0", "-k", "0"]) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "INVALID_ARGUMENT" and err["message"].startswith("k:")
    assert cli_main([*base[:4], "--token", "bad", "model-info"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "UNAUTHENTICATED"


# -- hot reload ----------------------------------------------------------------------------
def test_reload_under_load_and_corrupt_bundle_refused(tmp_path: Path) -> None:
    r = Running(tmp_path)
    try:
        c = r.client
        c.ingest([ev("reload-user", "B7", "purchase")])
        stop = threading.Event()
        failures: list[str] = []
        versions: set[str] = set()
        calls = [0]

        def hammer() -> None:
            with Client(r.target, timeout=10) as hc:
                while not stop.is_set():
                    try:
                        resp = hc.recommend("uA0", k=3)
                        versions.add(resp.model_version)
                        if ids(resp) != ["A2", "A3", "A4"]:
                            failures.append(f"wrong answer {ids(resp)}")
                        calls[0] += 1
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code()}: {exc.details()}")

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        kb.build(r.models, "v2", shuffle_seed=1, make_current=False)  # same ids, new rows
        out = c.reload("v2")
        assert (out.model_version, out.previous_version, out.changed) == ("v2", "v1", True)
        assert out.refolded_users >= 1
        time.sleep(0.2)
        # a corrupt bundle is refused and v2 keeps serving
        bad = kb.build(r.models, "v3", make_current=False)
        kb.corrupt(bad)
        code, msg = code_of(lambda: c.reload("v3"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "checksum" in msg
        code, msg = code_of(lambda: c.reload("v-missing"))
        assert code == grpc.StatusCode.NOT_FOUND
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert failures == []
        assert calls[0] > 20 and versions == {"v1", "v2"}
        assert c.model_info().model_version == "v2"
        # the real-time user was re-folded onto v2's (permuted) factors
        rec = c.recommend("reload-user", k=2)
        assert rec.model_version == "v2" and ids(rec) == ["B0", "B1"]
        assert c.reload("v2").changed is False
        # the CURRENT pointer is what a plain reload (and the poller) follows
        from lake.bundle import set_current

        set_current(r.models, "v1")
        assert c.reload().model_version == "v1"
    finally:
        r.close()


def test_poller_follows_current_pointer(tmp_path: Path) -> None:
    r = Running(tmp_path, reload_poll_s=0.05)
    try:
        kb.build(r.models, "v2", shuffle_seed=3)  # make_current=True moves CURRENT
        deadline = time.monotonic() + 10
        while r.client.model_info().model_version != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.client.model_info().model_version == "v2"
        assert ids(r.client.recommend("uB1", k=2)) == ["B2", "B3"]
    finally:
        r.close()


def test_forgotten_batch_user_stays_hidden_after_restart(tmp_path: Path) -> None:
    r = Running(tmp_path)
    try:
        assert r.client.recommend("uB1", k=2).strategy == pb.STRATEGY_PERSONALISED
        r.client.forget_user("uB1")
        assert r.client.recommend("uB1", k=2).strategy == pb.STRATEGY_FALLBACK
    finally:
        r.close()
    erased = r.server.lake.read("user_erasures").to_pylist()
    assert [e["user_id"] for e in erased] == ["uB1"]
    r = Running(tmp_path)  # the bundle still holds uB1's factors: the erasure must win
    try:
        assert r.client.recommend("uB1", k=2).strategy == pb.STRATEGY_FALLBACK
        assert r.client.recommend("uB0", k=2).strategy == pb.STRATEGY_PERSONALISED
        # a model trained after the erasure may know the user again (new events only)
        kb.build(r.models, "v2")
        r.client.reload()
        assert r.client.recommend("uB1", k=2).strategy == pb.STRATEGY_PERSONALISED
    finally:
        r.close()


def test_restart_keeps_real_time_state_from_the_lake(tmp_path: Path) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    r = Running(tmp_path, as_of=yesterday)  # the model learned events up to yesterday
    try:
        r.client.ingest([ev("warm-user", "C6", "purchase"), ev("warm-user", "C7", "purchase")])
        assert ids(r.client.recommend("warm-user", k=2)) == ["C0", "C1"]
    finally:
        r.close()  # graceful: flushes the WAL to bronze
    r = Running(tmp_path)
    try:
        resp = r.client.recommend("warm-user", k=2)
        assert resp.strategy == pb.STRATEGY_PERSONALISED and ids(resp) == ["C0", "C1"]
    finally:
        r.close()


def test_partial_upsert_keeps_the_fields_it_does_not_set(tmp_path: Path) -> None:
    r = Running(tmp_path)
    try:
        r.client.upsert_items([{"item_id": "A3", "category": "shoes", "price": 9.5,
                                "title": "Red shoes", "available": True}])
        r.client.upsert_items([{"item_id": "A3", "available": False}])  # availability only
        r.client.upsert_items([{"item_id": "A3", "title": "Red shoes v2"}])  # title only
        r.client.upsert_items([{"item_id": "NEW-X", "price": 1.0}])  # new: defaults
        info = r.server.engine.catalog.get("A3")
        assert (info.category, info.price, info.available, info.title) == (
            "shoes", 9.5, False, "Red shoes v2")
        # still in its category for the filters, but not offered while unavailable
        resp = r.client.recommend("uA0", k=5, include_categories=["shoes"], only_available=False)
        assert ids(resp) == ["A3"]
        assert ids(r.client.recommend("uA0", k=5, include_categories=["shoes"])) == []
    finally:
        r.close()
    rows = {x["item_id"]: x for x in r.server.lake.read("items").to_pylist()}
    assert (rows["A3"]["category"], rows["A3"]["price"], rows["A3"]["available"],
            rows["A3"]["title"]) == ("shoes", 9.5, False, "Red shoes v2")
    assert (rows["NEW-X"]["available"], rows["NEW-X"]["category"]) == (True, None)
    r = Running(tmp_path)  # a restart reloads the catalogue from the lake
    try:
        assert r.server.engine.catalog.get("A3").category == "shoes"
        assert r.server.engine.catalog.get("A3").available is False
    finally:
        r.close()


def test_a_reload_keeps_late_events_the_new_model_never_saw(tmp_path: Path) -> None:
    """Events with an old `ts` that reached the lake after training read it survive a
    reload and a restart: the model's cut is on arrival, not only on event time."""
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    r = Running(tmp_path)
    try:
        trained_read = datetime.now(UTC)  # the next model read the lake up to here...
        r.client.ingest([ev("late-user", "C6", "purchase", ts=three_days_ago),
                         ev("late-user", "C7", "purchase", ts=three_days_ago)])  # ...then these
        assert ids(r.client.recommend("late-user", k=2)) == ["C0", "C1"]
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        cut = TrainingCut(today, trained_read)  # as-of yesterday: the ts alone says "learned"
        yesterday = (today - timedelta(days=1)).date().isoformat()
        kb.build(r.models, "v2", as_of=yesterday, manifest=cut.to_manifest())
        assert r.client.reload().model_version == "v2"
        resp = r.client.recommend("late-user", k=2)
        assert resp.strategy == pb.STRATEGY_PERSONALISED and ids(resp) == ["C0", "C1"]
    finally:
        r.close()  # graceful: the WAL reaches bronze
    r = Running(tmp_path)  # warm start from bronze finds them by their arrival time
    try:
        resp = r.client.recommend("late-user", k=2)
        assert resp.strategy == pb.STRATEGY_PERSONALISED and ids(resp) == ["C0", "C1"]
    finally:
        r.close()
