"""Impressions through a real server (127.0.0.1, port 0), the known bundle
(tests/online_bundles.py: answers known in advance), the real ingest pipeline and real
Delta tables: every answer's recommendation_id, what `bronze_impressions` holds after a
graceful stop, sampling, erasure, the counters, and events that name their list."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import online_bundles as kb
import pytest
from lambdarec_client import Client

from lake.config import load_settings
from lake.tables import Lake
from online.server import OnlineServer, create_server

TOKEN = "impressions-test-token"


class Running:
    """A started server on `tmp`; `stop()` is the graceful stop (flushes everything)."""

    def __init__(self, tmp: Path, *, impressions: dict[str, Any] | None = None,
                 **server: Any) -> None:
        models = tmp / "models"
        if not (models / "v1").exists():
            kb.build(models, "v1")
        self.settings = load_settings(env={}, overrides={
            "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(models)},
            "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                       "admin_token": TOKEN, "wal_dir": str(tmp / "wal"),
                       "flush_interval_s": 3600.0, **server},
            "impressions": impressions or {}})
        self.lake = Lake(tmp / "lake")
        self.server: OnlineServer
        self.server, ports = create_server(self.settings, metrics=False)
        self.server.start()
        self.client = Client(f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}",
                             token=TOKEN, timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(grace=1)

    def impressions(self) -> dict[str, dict[str, Any]]:
        """bronze_impressions by recommendation_id (each id must be there once)."""
        if not self.lake.exists("bronze_impressions"):
            return {}
        rows = self.lake.read("bronze_impressions").to_pylist()
        out = {r["recommendation_id"]: r for r in rows}
        assert len(out) == len(rows), "an impression is in bronze twice"
        return out


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    yield r
    r.stop()  # a second stop is a no-op


def shown(resp: Any) -> list[dict[str, Any]]:
    """A response's items as bronze_impressions stores them."""
    return [{"item_id": i.item_id, "position": p, "score": i.score}
            for p, i in enumerate(resp.items)]


def test_a_recommend_is_in_bronze_impressions_after_a_graceful_stop(srv: Running) -> None:
    before = datetime.now(UTC)
    r = srv.client.recommend("uA0", k=3, exclude_item_ids=["A2"])
    ctx = srv.client.recommend("uB0", k=2, context_item_ids=["C0"])
    new = srv.client.recommend("someone-new", k=3)
    assert [i.item_id for i in r.items] == ["A3", "A4", "A5"]  # A0, A1 seen, A2 excluded
    assert [i.item_id for i in new.items] == kb.TOP_POPULAR  # no vector: popularity
    ids = [r.recommendation_id, ctx.recommendation_id, new.recommendation_id]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == 3
    srv.stop()
    after = datetime.now(UTC)
    got = srv.impressions()
    assert set(got) == set(ids)
    row = got[r.recommendation_id]
    assert before <= row.pop("ts") <= after
    assert row.pop("impression_date") in {before.date(), after.date()}
    assert row == {
        "recommendation_id": r.recommendation_id, "tenant": "", "surface": "recommend",
        "user_id": "uA0", "anchor_item_id": None, "items": shown(r), "model_version": "v1",
        "strategy": "personalised", "experiment_id": "", "arm": "",
        "context": '{"filters":{"exclude_seen":true,"only_available":true,'
                   '"exclude_item_ids":["A2"]}}'}
    assert json.loads(got[ctx.recommendation_id]["context"]) == {
        "filters": {"exclude_seen": True, "only_available": True},
        "context_item_ids": ["C0"]}
    fallback = got[new.recommendation_id]
    assert (fallback["user_id"], fallback["strategy"], fallback["items"]) == (
        "someone-new", "fallback", shown(new))


def test_recommend_batch_gives_each_answer_its_own_id(srv: Running) -> None:
    resp = srv.client.recommend_batch([{"user_id": "uA0", "k": 2}, {"user_id": "uB1", "k": 2},
                                       {"user_id": "uA0", "k": 2}])
    ids = [a.recommendation_id for a in resp.responses]
    assert len(set(ids)) == 3 and all(ids)
    srv.stop()
    got = srv.impressions()
    assert [(got[i]["user_id"], got[i]["items"]) for i in ids] == [
        ("uA0", shown(resp.responses[0])), ("uB1", shown(resp.responses[1])),
        ("uA0", shown(resp.responses[2]))]


def test_similar_items_answers_are_impressions_with_their_viewer(srv: Running) -> None:
    seen_by = srv.client.similar("B0", k=3, user_id="uA0")
    anonymous = srv.client.similar("B0", k=3)
    assert [i.item_id for i in seen_by.items] == ["B1", "B2", "B3"]
    assert seen_by.recommendation_id != anonymous.recommendation_id
    with pytest.raises(grpc.RpcError) as bad:
        srv.client.similar("B0", k=3, user_id=" ")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith("user_id:")
    srv.stop()
    got = srv.impressions()
    assert set(got) == {seen_by.recommendation_id, anonymous.recommendation_id}
    for resp, viewer in ((seen_by, "uA0"), (anonymous, None)):
        row = got[resp.recommendation_id]
        assert (row["surface"], row["user_id"], row["anchor_item_id"], row["strategy"],
                row["model_version"], row["items"], row["experiment_id"], row["arm"]) == (
            "similar", viewer, "B0", "similar", "v1", shown(resp), "", "")
        assert json.loads(row["context"]) == {"filters": {"only_available": True}}


def recorded_at(rate: float, rec_id: str) -> bool:
    """The sampling rule written out: sha256(id)'s first 8 bytes / 2**64 < rate."""
    return int.from_bytes(hashlib.sha256(rec_id.encode()).digest()[:8], "big") / 2**64 < rate


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_sampling_keeps_the_ids_the_hash_picks_and_every_answer_has_one(
        tmp_path: Path, rate: float) -> None:
    r = Running(tmp_path, impressions={"sample_rate": rate})
    ids = [r.client.recommend(f"uA{n % 3}", k=2).recommendation_id for n in range(40)]
    ids.append(r.client.similar("A0", k=2).recommendation_id)
    r.stop()
    assert len(set(ids)) == len(ids) and all(ids)
    want = {i for i in ids if recorded_at(rate, i)}
    assert set(r.impressions()) == want
    if rate:
        assert 5 <= len(want) <= 36  # 41 draws at one half: anything else is not sampling
    counted = r.server.metrics.registry.get_sample_value(
        "lambdarec_impressions_total", {"model_version": "v1", "strategy": "personalised",
                                        "experiment": "", "arm": ""})
    assert counted == 40  # every answer served counts, recorded or not


def test_counters_by_model_strategy_experiment_and_arm(srv: Running) -> None:
    srv.client.recommend("uA0", k=2)
    srv.client.recommend("uA1", k=2)
    srv.client.recommend("never-seen", k=2)
    srv.client.similar("A0", k=2)
    exp = srv.client.create_experiment("impression-arms", [{"name": "left", "share": 0.5},
                                                           {"name": "right", "share": 0.5}])
    answers = [srv.client.recommend(f"u{c}{i}", k=2) for c in "ABC" for i in range(3)]
    value = srv.server.metrics.registry.get_sample_value

    def count(strategy: str, experiment: str = "", arm: str = "") -> float | None:
        return value("lambdarec_impressions_total", {"model_version": "v1",
                                                     "strategy": strategy,
                                                     "experiment": experiment, "arm": arm})

    assert (count("personalised"), count("fallback"), count("similar")) == (2, 1, 1)
    arms = [a.arm for a in answers]
    assert {a.experiment_id for a in answers} == {exp.experiment_id}
    assert set(arms) <= {"left", "right"}
    for arm in ("left", "right"):
        assert (count("personalised", exp.experiment_id, arm) or 0) == arms.count(arm)
    srv.stop()
    got = srv.impressions()
    assert [(got[a.recommendation_id]["experiment_id"], got[a.recommendation_id]["arm"])
            for a in answers] == [(exp.experiment_id, a.arm) for a in answers]


def test_forget_user_removes_the_users_impressions(srv: Running) -> None:
    kept = srv.client.recommend("uB0", k=2).recommendation_id
    early = [srv.client.recommend("uA0", k=2).recommendation_id for _ in range(2)]
    srv.server.ingest.impressions.write_now()
    srv.server.ingest.flush()  # these two are in bronze_impressions now
    assert {"uA0", "uB0"} <= {r["user_id"] for r in srv.impressions().values()}
    srv.client.recommend("uA0", k=2)  # waiting in memory or the WAL when the erasure comes
    srv.client.similar("A0", k=2, user_id="uA0")
    reply = srv.client.forget_user("uA0")
    assert json.loads(reply.lake_json)["bronze_impressions"] == len(early)
    later = srv.client.recommend("uA0", k=2).recommendation_id  # after it: kept
    srv.stop()
    got = srv.impressions()
    assert set(got) == {kept, later}
    assert srv.lake.read("bronze_impressions").num_rows == 2


def test_an_event_naming_its_list_lands_in_bronze_with_it(srv: Running) -> None:
    rec = srv.client.recommend("uA0", k=2)
    now = datetime.now(UTC)
    item = rec.items[0].item_id
    out = srv.client.ingest([
        {"event_id": "e-named", "user_id": "uA0", "item_id": item, "event_type": "click",
         "ts": now, "recommendation_id": rec.recommendation_id},
        {"event_id": "e-plain", "user_id": "uA0", "item_id": item, "event_type": "view",
         "ts": now},
        {"event_id": "e-bad", "user_id": "uA0", "item_id": item, "event_type": "click",
         "ts": now, "recommendation_id": "bad\x01id"},
    ])
    assert (out.accepted, [r.index for r in out.rejected]) == (2, [2])
    assert "'recommendation_id'" in out.rejected[0].reason
    srv.stop()
    rows = srv.lake.read("bronze_events", columns=["event_id", "recommendation_id"])
    assert sorted(zip(rows["event_id"].to_pylist(), rows["recommendation_id"].to_pylist(),
                      strict=True)) == [("e-named", rec.recommendation_id), ("e-plain", "")]
