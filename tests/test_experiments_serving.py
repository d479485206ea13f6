"""Experiments served by a real server (127.0.0.1, port 0) on a real lake and bundles
(`tests/online_bundles.py`: answers known in advance): the Admin RPCs, each arm's model,
popularity and blend weight, refusals at Create, the file followed within a second,
restarts, erasures in every held model."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import online_bundles as kb
import pytest
from lambdarec_client import Client

from lake.blend import BlendParams
from lake.config import load_settings
from lake.experiments import ExperimentStore, new_experiment
from online.pb import recommender_pb2 as pb
from online.server import OnlineServer, create_server

TOKEN = "experiments-test-token"
KNOWN_USERS = [f"u{c}{i}" for c in "ABC" for i in range(3)]


def arm_of(salt: str, user: str, arms: list[tuple[str, float]],
           traffic: float = 1.0) -> str | None:
    """The arm the issue's formula gives (written out here, not lake.experiments')."""
    h = int.from_bytes(hashlib.sha256(f"{salt}\x1f{user}".encode()).digest()[:8],
                       "big") / 2**64
    if h >= traffic:
        return None
    u, total = h / traffic, 0.0
    for name, share in arms:
        total += share
        if u < total:
            return name
    return arms[-1][0]


def salt_where(want: dict[str, str], arms: list[tuple[str, float]]) -> str:
    """A salt that puts each user of `want` in its arm."""
    for i in range(10_000):
        salt = f"salt-{i}"
        if all(arm_of(salt, u, arms) == a for u, a in want.items()):
            return salt
    raise AssertionError("no salt found")


def settings_for(tmp: Path, **server: Any) -> Any:
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": TOKEN, "wal_dir": str(tmp / "wal"), **server}})


class Running:
    def __init__(self, tmp: Path, **server: Any) -> None:
        self.settings = settings_for(tmp, **server)
        self.server: OnlineServer
        self.server, ports = create_server(self.settings, metrics=False)
        self.server.start()
        self.client = Client(f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}",
                             token=TOKEN, timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(grace=1)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    m = tmp_path / "models"
    kb.build(m, "v1")
    kb.build(m, "v2", make_current=False, shuffle_seed=5)
    kb.build(m, "vb", make_current=False, blend=BlendParams(beta=0.01, n0=10.0))
    return m


@pytest.fixture
def running(tmp_path: Path, models: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    try:
        yield r
    finally:
        r.stop()


def ids(resp: Any) -> list[str]:
    return [i.item_id for i in resp.items]


def within(bound_s: float, check: Callable[[], bool]) -> float:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > bound_s:
            pytest.fail(f"not true within {bound_s} s")
        time.sleep(0.02)
    return time.perf_counter() - t0


ARMS3 = [("control", 0.4), ("challenger", 0.4), ("holdout", 0.2)]


def create3(client: Client, salt: str) -> Any:
    return client.create_experiment("three", [
        {"name": "control", "share": 0.4},
        {"name": "challenger", "share": 0.4, "model_version": "v2"},
        {"name": "holdout", "share": 0.2, "popularity": True}], salt=salt)


def test_each_arm_serves_its_model_and_the_answer_names_it(running: Running) -> None:
    salt = salt_where({"uA0": "control", "uB0": "challenger", "uC0": "holdout"}, ARMS3)
    c = running.client
    exp = create3(c, salt)
    assert (exp.state, exp.salt, exp.traffic) == ("running", salt, 1.0)
    assert running.server.manager.model("v2") is not None  # loaded before the answer

    control, challenger, holdout = (c.recommend(u, k=3) for u in ("uA0", "uB0", "uC0"))
    assert (control.experiment_id, control.arm, control.model_version) == (
        exp.experiment_id, "control", "v1")
    assert ids(control) == ["A2", "A3", "A4"]  # A0, A1 seen
    assert (challenger.arm, challenger.model_version) == ("challenger", "v2")
    assert ids(challenger) == ["B2", "B3", "B4"]  # the same answers, v2 rows shuffled
    # holdout: the popularity ranking B3 > A7 > C1 > the rest, minus the seen C0, C1
    assert holdout.arm == "holdout" and holdout.strategy == pb.STRATEGY_FALLBACK
    assert ids(holdout)[:2] == ["B3", "A7"] and "C1" not in ids(holdout)

    batch = c.recommend_batch([{"user_id": u, "k": 2} for u in KNOWN_USERS])
    for u, resp in zip(KNOWN_USERS, batch.responses, strict=True):
        assert resp.arm == arm_of(salt, u, ARMS3) and resp.experiment_id == exp.experiment_id
        want = {"control": "v1", "challenger": "v2", "holdout": "v1"}[resp.arm]
        assert resp.model_version == want

    # SimilarItems has no arms: the champion
    assert c.similar("A0", k=2).model_version == "v1"

    stopped = c.stop_experiment(exp.experiment_id)
    assert stopped.state == "stopped" and stopped.stopped_at.seconds > 0
    after = c.recommend("uB0", k=3)
    assert (after.experiment_id, after.arm, after.model_version) == ("", "", "v1")
    assert [m.version for m in running.server.manager.models()] == ["v1"]  # v2 released
    listed = c.list_experiments().experiments
    assert [e.experiment_id for e in listed] == [exp.experiment_id]
    assert c.get_experiment(exp.experiment_id).state == "stopped"


def test_traffic_leaves_users_outside_with_the_champion_and_no_arm(running: Running) -> None:
    arms = [("a", 0.5), ("b", 0.5)]
    salt = next(f"t{i}" for i in range(10_000)
                if arm_of(f"t{i}", "uA0", arms, 0.3) is None
                and arm_of(f"t{i}", "uB0", arms, 0.3) == "b")
    c = running.client
    c.create_experiment("partial", [{"name": "a", "share": 0.5},
                                    {"name": "b", "share": 0.5, "model_version": "v2"}],
                        traffic=0.3, salt=salt)
    outside, inside = c.recommend("uA0", k=2), c.recommend("uB0", k=2)
    assert (outside.experiment_id, outside.arm, outside.model_version) == ("", "", "v1")
    assert (inside.arm, inside.model_version) == ("b", "v2")


def test_an_arms_blend_weight_changes_its_users_scores(running: Running) -> None:
    """vb's index carries the popularity prior (beta 0.01: nearly plain ALS). With
    blend_weight 100, uA0 (2 history items: w = 100 x 10 / 12 = 83) gets the popular items
    B3, A7, C1 (priors 1, 0.9, 0.8) above its own cluster."""
    arms = [("plain", 0.5), ("heavy", 0.5)]
    salt = salt_where({"uA0": "heavy", "uA1": "plain"}, arms)
    c = running.client
    c.create_experiment("blend", [
        {"name": "plain", "share": 0.5, "model_version": "vb"},
        {"name": "heavy", "share": 0.5, "model_version": "vb",
         "settings": {"blend_weight": "100"}}], salt=salt)
    heavy, plain = c.recommend("uA0", k=3), c.recommend("uA1", k=3)
    assert (heavy.arm, heavy.model_version, ids(heavy)) == ("heavy", "vb", ["B3", "A7", "C1"])
    assert (plain.arm, plain.model_version, ids(plain)) == ("plain", "vb", ["A2", "A3", "A4"])


def test_create_refuses_what_it_cannot_serve_and_writes_nothing(tmp_path: Path,
                                                                 models: Path) -> None:
    kb.build(models, "v3", make_current=False)
    r = Running(tmp_path, max_models=2)
    c = r.client
    file = tmp_path / "lake" / "experiments.json"
    try:
        def refused(arms: list[dict], code: grpc.StatusCode, message: str,
                    **kw: Any) -> None:
            with pytest.raises(grpc.RpcError) as err:
                c.create_experiment("x", arms, **kw)
            assert err.value.code() == code, err.value.details()
            assert message in err.value.details(), err.value.details()
            assert [m.version for m in r.server.manager.models()] == ["v1"]
            assert not file.exists() or not json.loads(file.read_text())["experiments"]

        ctl = {"name": "c", "share": 0.5}
        refused([ctl, {"name": "m", "share": 0.5, "model_version": "v9"}],
                grpc.StatusCode.FAILED_PRECONDITION, "model version 'v9'")
        (models / "staging-like").mkdir()
        refused([ctl, {"name": "m", "share": 0.5, "model_version": "staging-like"}],
                grpc.StatusCode.FAILED_PRECONDITION, "model version 'staging-like'")
        refused([ctl, {"name": "a", "share": 0.25, "model_version": "v2"},
                 {"name": "b", "share": 0.25, "model_version": "v3"}],
                grpc.StatusCode.FAILED_PRECONDITION,
                "needs 3 models in memory (v1, v2, v3, the champion included), above "
                "server.max_models 2")
        refused([{**ctl, "settings": {"blend_weight": "0.5"}},
                 {"name": "m", "share": 0.5, "model_version": "v2"}],
                grpc.StatusCode.FAILED_PRECONDITION,
                "arms[0].settings.blend_weight: model v1 was built without the popularity")
        refused([ctl, {"name": "m", "share": 0.6}], grpc.StatusCode.INVALID_ARGUMENT,
                "arms: shares must sum to 1, got 1.1")
        refused([ctl, {"name": "m", "share": 0.5, "settings": {"speed": "1"}}],
                grpc.StatusCode.INVALID_ARGUMENT, "arms[1].settings: unknown setting 'speed'")
        refused([ctl, {"name": "m", "share": 0.5}], grpc.StatusCode.INVALID_ARGUMENT,
                "traffic: must be in (0, 1], got 0.0", traffic=0.0)

        first = c.create_experiment("ok", [ctl, {"name": "m", "share": 0.5,
                                                 "model_version": "v2"}])
        with pytest.raises(grpc.RpcError) as err:
            c.create_experiment("second", [ctl, {"name": "m", "share": 0.5}])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"experiment {first.experiment_id} ('ok') is running" in err.value.details()
        for call in (c.get_experiment, c.stop_experiment):
            with pytest.raises(grpc.RpcError) as err:
                call("exp-nope")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                call("")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "experiment_id: must not be empty"
    finally:
        r.stop()


def test_the_server_follows_the_file_within_a_second(running: Running) -> None:
    """An experiment written by another process (the CLI, another replica) is served after
    one stat and its model's load; its stop likewise."""
    store = ExperimentStore(Path(running.settings.lake.root) / "experiments.json")
    arms = [("a", 0.5), ("b", 0.5)]
    salt = salt_where({"uB0": "b"}, arms)
    exp = store.create(new_experiment("from-file", [
        {"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "model_version": "v2"}],
        salt=salt))
    c = running.client
    seen = within(3.0, lambda: c.recommend("uB0", k=1).arm == "b")
    assert c.recommend("uB0", k=1).model_version == "v2"
    assert seen < 3.0
    store.stop(exp.experiment_id)
    within(3.0, lambda: c.recommend("uB0", k=1).arm == "")
    within(3.0, lambda: [m.version for m in running.server.manager.models()] == ["v1"])


def test_a_restart_serves_the_same_arms_from_its_first_request(tmp_path: Path,
                                                               models: Path) -> None:
    r = Running(tmp_path)
    try:
        exp = create3(r.client, "restart-salt")
        before = {u: (resp.arm, resp.model_version)
                  for u, resp in zip(KNOWN_USERS, r.client.recommend_batch(
                      [{"user_id": u, "k": 2} for u in KNOWN_USERS]).responses, strict=True)}
    finally:
        r.stop()
    again = Running(tmp_path)
    try:
        first = again.client.recommend(KNOWN_USERS[0], k=2)  # no wait: loaded at start
        assert first.experiment_id == exp.experiment_id
        after = {u: (again.client.recommend(u, k=2).arm,
                     again.client.recommend(u, k=2).model_version) for u in KNOWN_USERS}
        assert after == before
        assert {a for a, _ in after.values()} <= {"control", "challenger", "holdout"}
    finally:
        again.stop()


def test_forget_user_hides_the_user_in_every_held_model(running: Running) -> None:
    arms = [("a", 0.5), ("b", 0.5)]
    salt = salt_where({"uB1": "b", "uA1": "a"}, arms)
    c = running.client
    c.create_experiment("erase", [{"name": "a", "share": 0.5},
                                  {"name": "b", "share": 0.5, "model_version": "v2"}],
                        salt=salt)
    assert c.recommend("uB1", k=2).strategy == pb.STRATEGY_PERSONALISED
    c.forget_user("uB1")
    c.forget_user("uA1")
    for user in ("uB1", "uA1"):
        resp = c.recommend(user, k=2)
        assert resp.strategy == pb.STRATEGY_FALLBACK, user
    for model in running.server.manager.models():
        assert model.batch_user_vector("uB1") is None
    assert running.server.manager.model("v2").batch_user_vector("uB0") is not None


def test_a_champion_reload_keeps_an_arm_on_its_pinned_version(running: Running) -> None:
    arms = [("old", 0.5), ("champ", 0.5)]
    salt = salt_where({"uA0": "old", "uB0": "champ"}, arms)
    c = running.client
    c.create_experiment("pinned", [{"name": "old", "share": 0.5, "model_version": "v1"},
                                   {"name": "champ", "share": 0.5}], salt=salt)
    c.reload("v2")  # the champion moves on
    assert (c.recommend("uA0", k=1).model_version, c.recommend("uB0", k=1).model_version) \
        == ("v1", "v2")
    assert sorted(m.version for m in running.server.manager.models()) == ["v1", "v2"]


def test_the_client_cli_creates_lists_gets_and_stops(running: Running) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    srv = running.server
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAMBDAREC")},
           "PYTHONPATH": str(root / "clients" / "python")}
    base = [sys.executable, "-m", "lambdarec_client",
            "--target", f"127.0.0.1:{srv.ports['grpc']}",
            "--admin-target", f"127.0.0.1:{srv.ports['admin']}", "--token", TOKEN]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, cwd=root, text=True,
                              capture_output=True, timeout=60)

    made = cli("create-experiment", "--name", "cli", "--arm", "control:0.5",
               "--arm", "challenger:0.4:v2", "--arm", "holdout:0.1:@popularity",
               "--traffic", "0.5", "--salt", "cli-salt")
    assert made.returncode == 0, made.stderr
    exp = json.loads(made.stdout)
    assert [(a["name"], a["model_version"], a["popularity"]) for a in exp["arms"]] == [
        ("control", "", False), ("challenger", "v2", False), ("holdout", "", True)]
    assert (exp["traffic"], exp["salt"], exp["state"]) == (0.5, "cli-salt", "running")
    listed = json.loads(cli("list-experiments").stdout)["experiments"]
    assert [e["experiment_id"] for e in listed] == [exp["experiment_id"]]
    assert json.loads(cli("get-experiment", exp["experiment_id"]).stdout)["name"] == "cli"
    assert json.loads(cli("stop-experiment", exp["experiment_id"]).stdout)["state"] == \
        "stopped"
    refused = cli("create-experiment", "--name", "x", "--arm", "a:0.5", "--arm", "b:0.5:v9")
    assert refused.returncode == 1
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and "model version 'v9'" in error["message"]
    bad = cli("create-experiment", "--name", "x", "--arm", "a", "--arm", "b:0.5")
    assert bad.returncode == 2 and "--arm 'a'" in bad.stderr
