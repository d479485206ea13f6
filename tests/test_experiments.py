"""Experiments in the lake (`lake.experiments`): assignment with known answers, the split over
10k users, the JSON store (atomic, locked, validated with one-line errors), the model checks,
and the command line (create / list / show / stop / promote) as its own process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import online_bundles as kb
import pytest

from lake.bundle import current_version
from lake.config import load_settings
from lake.experiments import (
    ExperimentConflict,
    ExperimentError,
    ExperimentNotFound,
    ExperimentStore,
    StoreError,
    assign,
    check_models,
    experiments_file,
    new_experiment,
    parse_arm,
    promote,
)

ROOT = Path(__file__).resolve().parent.parent
SALT = "salt-A"
ARMS = [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.3},
        {"name": "holdout", "share": 0.2, "popularity": True}]

# The first 8 bytes of sha256("salt-A" + "\x1f" + user id), from `sha256sum` in a shell:
#   printf 'salt-A\x1f%s' u1 | sha256sum
HASH_PREFIX = {"u1": "c6a2f701c8b88b7e", "u2": "ea58819dd9c26919", "u3": "e1d1362733051f1f",
               "alice": "99204edb06bc8de2", "ü-42": "8f09cab5cd9f78d9",
               "u6": "32b930498f1b4529", "u7": "46d9ddeb6286ce7b", "u8": "5c9ea1c01f376acd",
               "bob": "ab072b4a486521d6"}


def experiment(traffic: float = 1.0, salt: str = SALT, arms: list | None = None):
    return new_experiment("test", arms or ARMS, traffic=traffic, salt=salt)


# -- assignment ------------------------------------------------------------------------------
def test_assignment_known_answers_at_full_traffic() -> None:
    # h = prefix / 2**64: u6 0.198, u7 0.277, u8 0.362 < 0.5 -> control; alice 0.598,
    # ü-42 0.559, bob 0.668, u1 0.776 in [0.5, 0.8) -> treatment; u3 0.882, u2 0.915 -> holdout
    exp = experiment()
    assert {u: assign(exp, u) for u in HASH_PREFIX} == {
        "u6": "control", "u7": "control", "u8": "control",
        "alice": "treatment", "ü-42": "treatment", "bob": "treatment", "u1": "treatment",
        "u3": "holdout", "u2": "holdout"}


def test_assignment_known_answers_with_partial_traffic() -> None:
    # traffic 0.9: u2 (0.915) is out; the others' u = h / 0.9: u1 0.862 and u3 0.980 ->
    # holdout, alice 0.665, ü-42 0.621, bob 0.742 -> treatment, u6/u7/u8 (< 0.41) -> control
    exp = experiment(traffic=0.9)
    assert {u: assign(exp, u) for u in HASH_PREFIX} == {
        "u6": "control", "u7": "control", "u8": "control",
        "alice": "treatment", "ü-42": "treatment", "bob": "treatment",
        "u1": "holdout", "u3": "holdout", "u2": None}


def test_the_hash_prefixes_above_are_what_hashlib_says() -> None:
    for user, prefix in HASH_PREFIX.items():
        digest = hashlib.sha256(f"{SALT}\x1f{user}".encode()).hexdigest()
        assert digest[:16] == prefix


def test_assignment_follows_the_documented_formula_for_many_ids() -> None:
    exp = experiment(traffic=0.7)
    for i in range(500):
        user = f"user-{i}"
        h = int.from_bytes(hashlib.sha256(f"{SALT}\x1f{user}".encode()).digest()[:8],
                           "big") / 2**64
        if h >= 0.7:
            want = None
        else:
            u = h / 0.7
            want = "control" if u < 0.5 else "treatment" if u < 0.8 else "holdout"
        assert assign(exp, user) == want, user


@pytest.mark.parametrize("traffic", [1.0, 0.5])
def test_10k_users_split_as_configured_within_2_percent(traffic: float) -> None:
    exp = experiment(traffic=traffic, salt="split-test")
    counts = Counter(assign(exp, f"user-{i}") for i in range(10_000))
    taking_part = 10_000 - counts[None]
    assert abs(taking_part / 10_000 - traffic) <= 0.02
    for arm, share in (("control", 0.5), ("treatment", 0.3), ("holdout", 0.2)):
        assert abs(counts[arm] / taking_part - share) <= 0.02, (arm, counts)


def test_a_new_salt_reshuffles_users() -> None:
    a, b = experiment(salt="one"), experiment(salt="two")
    same = sum(assign(a, f"u{i}") == assign(b, f"u{i}") for i in range(10_000)) / 10_000
    # independent draws agree with probability 0.5^2 + 0.3^2 + 0.2^2 = 0.38
    assert abs(same - 0.38) <= 0.02


def test_a_new_experiment_gets_a_random_salt_and_an_id() -> None:
    a, b = new_experiment("x", ARMS), new_experiment("x", ARMS)
    assert a.salt != b.salt and len(a.salt) >= 16
    assert a.experiment_id != b.experiment_id and a.experiment_id.startswith("exp-")


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, "name: must not be empty"),
    ({"arms": [{"name": "a", "share": 1.0}]}, "arms: need at least 2 arms, got 1"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]},
     "arms: shares must sum to 1, got 0.9"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]},
     "arms[1].name: duplicate arm name 'a'"),
    ({"arms": [{"name": "a b", "share": 0.5}, {"name": "b", "share": 0.5}]},
     "arms[0].name: 'a b' is not an arm name"),
    ({"arms": [{"name": "a", "share": 0.0}, {"name": "b", "share": 1.0}]},
     "arms[0].share: must be in (0, 1], got 0.0"),
    ({"arms": [{"name": "a", "share": float("nan")}, {"name": "b", "share": 1.0}]},
     "arms[0].share: must be finite"),
    ({"arms": [{"name": "a", "share": 0.5, "model_version": "../x"},
               {"name": "b", "share": 0.5}]}, "arms[0].model_version: '../x' is not a model"),
    ({"arms": [{"name": "a", "share": 0.5, "settings": {"colour": "red"}},
               {"name": "b", "share": 0.5}]}, "arms[0].settings: unknown setting 'colour'"),
    ({"arms": [{"name": "a", "share": 0.5, "settings": {"blend_weight": "-1"}},
               {"name": "b", "share": 0.5}]},
     "arms[0].settings.blend_weight: must be finite and >= 0, got '-1'"),
    ({"arms": [{"name": "a", "share": 0.5, "settings": {"blend_weight": "x"}},
               {"name": "b", "share": 0.5}]}, "arms[0].settings.blend_weight: not a number"),
    ({"arms": [{"name": "a", "share": 0.5, "popularity": True,
                "settings": {"blend_weight": "1"}}, {"name": "b", "share": 0.5}]},
     "arms[0].settings: a popularity arm has no model"),
    ({"arms": [{"name": "a", "share": 0.5, "shares": 1}, {"name": "b", "share": 0.5}]},
     "arms[0].shares: unknown field"),
    ({"traffic": 0.0}, "traffic: must be in (0, 1], got 0.0"),
    ({"traffic": 1.5}, "traffic: must be in (0, 1], got 1.5"),
    ({"salt": "a\x1fb"}, "salt: contains the control character U+001F"),
])
def test_a_bad_definition_is_one_line_naming_the_field(kwargs: dict, message: str) -> None:
    args = {"name": "ok", "arms": ARMS, **kwargs}
    name, arms = args.pop("name"), args.pop("arms")
    with pytest.raises(ExperimentError) as err:
        new_experiment(name, arms, **args)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_a_popularity_arm_ignores_a_model_version() -> None:
    exp = new_experiment("x", [{"name": "a", "share": 0.5},
                               {"name": "p", "share": 0.5, "popularity": True,
                                "model_version": "v1"}])
    assert exp.arms[1].model_version == "" and exp.model_versions() == set()


# -- the store -------------------------------------------------------------------------------
def test_store_round_trip_newest_first_and_one_running(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path / "experiments.json")
    assert store.load() == [] and store.running() is None
    first = store.create(new_experiment("first", ARMS, salt="s1",
                                        now=datetime(2026, 1, 1, tzinfo=UTC)))
    with pytest.raises(ExperimentConflict, match=f"experiment {first.experiment_id} "
                                                 r"\('first'\) is running"):
        store.create(new_experiment("second", ARMS))
    stopped = store.stop(first.experiment_id, now=datetime(2026, 1, 2, tzinfo=UTC))
    assert stopped.state == "stopped" and stopped.stopped_at == datetime(2026, 1, 2, tzinfo=UTC)
    assert store.stop(first.experiment_id) == stopped  # a retried stop changes nothing
    second = store.create(new_experiment("second", ARMS,
                                         now=datetime(2026, 1, 3, tzinfo=UTC)))
    assert [e.experiment_id for e in store.load()] == [second.experiment_id,
                                                       first.experiment_id]
    assert store.running() == second
    assert store.get(first.experiment_id) == stopped
    # the file is plain JSON another process (a batch job) reads the same way
    raw = json.loads((tmp_path / "experiments.json").read_text())
    assert {e["experiment_id"] for e in raw["experiments"]} == {first.experiment_id,
                                                                second.experiment_id}
    assert ExperimentStore(tmp_path / "experiments.json").get(second.experiment_id) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments.json",
                                                          "experiments.json.lock"]
    with pytest.raises(ExperimentNotFound, match="no experiment 'nope'"):
        store.get("nope")
    with pytest.raises(ExperimentNotFound):
        store.stop("nope")


def test_concurrent_creators_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        try:
            ExperimentStore(path).create(new_experiment(f"e{i}", ARMS))
            outcomes.append("created")
        except ExperimentConflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["created"] + ["refused"] * 7
    assert len(ExperimentStore(path).load()) == 1


def test_a_broken_file_is_one_line_naming_the_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    store = ExperimentStore(path)
    path.write_text("{not json")
    with pytest.raises(StoreError, match=f"^{path}: not an experiments file"):
        store.load()
    good = new_experiment("x", ARMS).to_json()
    path.write_text(json.dumps({"experiments": [good, {**good, "traffic": 7}]}))
    with pytest.raises(StoreError, match=r"experiments\[1\]\.traffic: must be in \(0, 1\]"):
        store.load()
    path.write_text(json.dumps({"experiments": [{**good, "state": "paused"}]}))
    with pytest.raises(StoreError, match=r"experiments\[0\]\.state: must be 'running' or "):
        store.load()


# -- models ----------------------------------------------------------------------------------
def test_check_models_refuses_missing_staged_unblended_and_too_many(tmp_path: Path) -> None:
    models = tmp_path / "models"
    kb.build(models, "v1")  # CURRENT, no blend
    kb.build(models, "v2", make_current=False)
    (models / "v3").mkdir()  # not a bundle

    def arms(*versions: str, settings: dict | None = None) -> list[dict]:
        out = [{"name": "c", "share": 0.5, "settings": settings or {}}]
        share = 0.5 / len(versions)
        return out + [{"name": f"a{i}", "share": share, "model_version": v}
                      for i, v in enumerate(versions)]

    check_models(new_experiment("ok", arms("v2")), models, max_models=2)
    with pytest.raises(ExperimentConflict, match=r"arms\[1\].model_version: 'v9' is not a "
                                                 "readable bundle"):
        check_models(new_experiment("x", arms("v9")), models, max_models=3)
    with pytest.raises(ExperimentConflict, match=r"arms\[1\].model_version: 'v3'"):
        check_models(new_experiment("x", arms("v3")), models, max_models=3)
    with pytest.raises(ExperimentConflict, match="needs 2 models in memory .* above "
                                                 "server.max_models 1"):
        check_models(new_experiment("x", arms("v2")), models, max_models=1)
    with pytest.raises(ExperimentConflict, match=r"arms\[0\].settings.blend_weight: model v1 "
                                                 "was built without the popularity blend"):
        check_models(new_experiment("x", arms("v2", settings={"blend_weight": "0.5"})),
                     models, max_models=3)


def test_parse_arm() -> None:
    assert parse_arm("control:0.5") == {"name": "control", "share": 0.5, "model_version": "",
                                        "popularity": False, "settings": {}}
    assert parse_arm("c:0.5:@champion")["model_version"] == ""
    assert parse_arm("h:0.1:@popularity")["popularity"] is True
    assert parse_arm("b:0.4:v2:blend_weight=0.3") == {
        "name": "b", "share": 0.4, "model_version": "v2", "popularity": False,
        "settings": {"blend_weight": "0.3"}}
    with pytest.raises(ExperimentError, match="--arm: 'b' expected NAME:SHARE|--arm: 'b':"):
        parse_arm("b")


# -- the command line and promotion ----------------------------------------------------------
def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lake.experiments", *args], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=120)


def test_the_command_creates_lists_shows_stops_and_promotes(tmp_path: Path) -> None:
    env = {"LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
           "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"}
    models = tmp_path / "models"
    kb.build(models, "v1")
    kb.build(models, "v2", make_current=False)

    bad = run_cli(env, "create", "--name", "t", "--arm", "a:0.5", "--arm", "b:0.4:v2")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("python -m lake.experiments: error: arms: shares must sum "
                                  "to 1, got 0.9")
    missing = run_cli(env, "create", "--name", "t", "--arm", "a:0.5", "--arm", "b:0.5:v9")
    assert missing.returncode == 2 and "arms[1].model_version: 'v9'" in missing.stderr

    made = run_cli(env, "create", "--name", "t", "--arm", "control:0.5",
                   "--arm", "challenger:0.5:v2", "--traffic", "0.5", "--salt", "fixed")
    assert made.returncode == 0, made.stderr
    exp = json.loads(made.stdout)
    assert (exp["state"], exp["traffic"], exp["salt"]) == ("running", 0.5, "fixed")
    assert [(a["name"], a["model_version"]) for a in exp["arms"]] == [("control", ""),
                                                                      ("challenger", "v2")]
    listed = json.loads(run_cli(env, "list").stdout)
    assert [e["experiment_id"] for e in listed["experiments"]] == [exp["experiment_id"]]
    shown = json.loads(run_cli(env, "show", exp["experiment_id"]).stdout)
    assert shown == exp
    again = run_cli(env, "create", "--name", "u", "--arm", "a:0.5", "--arm", "b:0.5")
    assert again.returncode == 2 and "is running; at most one runs at a time" in again.stderr
    unknown = run_cli(env, "show", "nope")
    assert unknown.returncode == 2 and "no experiment 'nope'" in unknown.stderr

    popular = run_cli(env, "promote", exp["experiment_id"], "nope")
    assert popular.returncode == 2 and "has no arm 'nope'" in popular.stderr
    promoted = run_cli(env, "promote", exp["experiment_id"], "challenger")
    assert promoted.returncode == 0, promoted.stderr
    out = json.loads(promoted.stdout)
    assert (out["previous_current"], out["current"]) == ("v1", "v2")
    assert out["experiment"]["state"] == "stopped"
    assert current_version(models) == "v2"

    stopped = run_cli(env, "stop", exp["experiment_id"])
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["state"] == "stopped"


def test_promote_keeps_the_old_champion_a_rollback_target(tmp_path: Path) -> None:
    """Promotion moves CURRENT with lake.rollback's checks; the old champion stays
    `published`, so `lake.rollback` (no version) returns to it; a popularity arm cannot be
    promoted; a rejected version is refused."""
    import pyarrow as pa

    from lake import rollback
    from lake.model_runs import model_runs
    from lake.tables import Lake

    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                                "model": {"dir": str(tmp_path / "models")}})
    models = Path(settings.model.dir)
    for v in ("v1", "v2", "v3"):
        kb.build(models, v, make_current=v == "v1")
    lake = Lake.from_settings(settings.lake)
    now = datetime.now(UTC)
    lake.upsert("model_runs", pa.table({
        "model_version": ["v1", "v2", "v3"], "created_at": [now] * 3, "as_of": [None] * 3,
        "backend": ["implicit"] * 3, "params": ["{}"] * 3, "metrics": ["{}"] * 3,
        "status": ["current", "published", "rejected"], "gate_reason": ["", "", "worse"],
        "bundle_path": [""] * 3}))
    store = ExperimentStore(experiments_file(settings))
    exp = store.create(new_experiment("t", [
        {"name": "champion", "share": 0.4, "model_version": "v1"},
        {"name": "challenger", "share": 0.3, "model_version": "v2"},
        {"name": "rejected", "share": 0.2, "model_version": "v3"},
        {"name": "holdout", "share": 0.1, "popularity": True}]))
    with pytest.raises(ExperimentConflict, match="'holdout' is the popularity ranking"):
        promote(settings, exp.experiment_id, "holdout")
    with pytest.raises(ExperimentConflict, match="cannot promote arm 'rejected': version v3 "
                                                 "was rejected by the gate"):
        promote(settings, exp.experiment_id, "rejected")
    assert store.get(exp.experiment_id).running  # a refused promotion stops nothing

    out = promote(settings, exp.experiment_id, "challenger")
    assert (out["previous_current"], out["current"]) == ("v1", "v2")
    assert not store.get(exp.experiment_id).running
    runs = model_runs(lake)
    assert (runs["v1"]["status"], runs["v2"]["status"]) == ("published", "current")
    assert rollback.run(settings)["version"] == "v1"  # one command back
    assert current_version(models) == "v1"
