"""The gate (known numbers), publish (bundle, factor tables, model_runs, CURRENT), rollback."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from lake import rollback
from lake.bundle import current_version, list_versions, read_bundle
from lake.config import GateSettings, load_settings
from lake.foldin import FoldInParams
from lake.rollback import RollbackError
from lake.tables import Lake
from spark_jobs import publish
from spark_jobs.cli import JobError
from spark_jobs.gate import decide
from spark_jobs.staging import TrainedModel, save_metrics, save_staged

GATE = GateSettings(metric="ndcg@10", min_lift_over_popularity=0.10, max_regression=0.05)


# -- gate ----------------------------------------------------------------------------------
def test_gate_accepts_a_clear_lift_without_current():
    d = decide({"ndcg@10": 0.30}, {"ndcg@10": 0.20}, None, GATE)
    assert d.accepted
    assert "0.2200" in d.reason and "no current model" in d.reason


def test_gate_rejects_too_small_a_lift_over_popularity():
    d = decide({"ndcg@10": 0.21}, {"ndcg@10": 0.20}, None, GATE)  # needs 0.22
    assert not d.accepted
    assert "0.2100 < popularity 0.2000" in d.reason and "0.2200" in d.reason


def test_gate_lift_boundary_is_inclusive():
    gate = GateSettings(min_lift_over_popularity=0.5)  # binary-exact: 0.5 x 1.5 = 0.75
    assert decide({"ndcg@10": 0.75}, {"ndcg@10": 0.5}, None, gate).accepted
    assert not decide({"ndcg@10": 0.7499}, {"ndcg@10": 0.5}, None, gate).accepted


def test_gate_rejects_a_regression_beyond_tolerance():
    current = {"ndcg@10": 0.40}  # floor 0.40 x 0.95 = 0.38
    bad = decide({"ndcg@10": 0.37}, {"ndcg@10": 0.20}, current, GATE)
    assert not bad.accepted and "current 0.4000" in bad.reason and "0.3800" in bad.reason
    ok = decide({"ndcg@10": 0.39}, {"ndcg@10": 0.20}, current, GATE)
    assert ok.accepted and "current 0.4000" in ok.reason


@pytest.mark.parametrize(
    "new, why",
    [({}, "no ndcg@10"), ({"ndcg@10": float("nan")}, "not finite"),
     ({"ndcg@10": 0.0}, "not above 0"), ({"ndcg@10": None}, "no ndcg@10")],
)
def test_gate_rejects_missing_or_degenerate_metrics(new, why):
    d = decide(new, {"ndcg@10": 0.0}, None, GATE)
    assert not d.accepted and why in d.reason


def test_gate_says_when_the_test_set_is_too_small_to_decide():
    ev = {"n_test_users": 10, "min_test_users": 50}
    d = decide({"ndcg@10": 0.30}, {"ndcg@10": 0.20}, None, GATE, evidence=ev)
    assert not d.accepted
    assert d.reason == ("test set too small to decide: 10 test users < "
                        "evaluate.min_test_users = 50")
    ok = decide({"ndcg@10": 0.30}, {"ndcg@10": 0.20}, None, GATE,
                evidence={"n_test_users": 50, "min_test_users": 50})
    assert ok.accepted and "50 test users >= 50" in ok.reason


def test_gate_rejects_a_lift_within_noise():
    def ev(lo, hi):
        return {"intervals": {"confidence": 0.95,
                              "vs_popularity": {"ndcg@10": {"diff": 0.1, "ci": [lo, hi]}}}}

    noisy = decide({"ndcg@10": 0.30}, {"ndcg@10": 0.20}, None, GATE, evidence=ev(-0.01, 0.2))
    assert not noisy.accepted
    assert noisy.reason == ("ndcg@10 lift over popularity +0.1000 is within noise: paired 95% "
                            "interval [-0.0100, +0.2000] includes 0")
    clear = decide({"ndcg@10": 0.30}, {"ndcg@10": 0.20}, None, GATE, evidence=ev(0.05, 0.15))
    assert clear.accepted and "interval [+0.0500, +0.1500] above 0" in clear.reason
    # the relative lift is checked first: a significant but too small lift still fails
    small = decide({"ndcg@10": 0.21}, {"ndcg@10": 0.20}, None, GATE, evidence=ev(0.005, 0.02))
    assert not small.accepted and "popularity" in small.reason


def test_gate_uses_the_configured_metric_and_force_overrides():
    gate = GateSettings(metric="recall@20", min_lift_over_popularity=0.5, max_regression=0.0)
    d = decide({"recall@20": 0.3, "ndcg@10": 0.9}, {"recall@20": 0.25}, None, gate)
    assert not d.accepted and "recall@20" in d.reason  # needs 0.375
    forced = decide({"recall@20": 0.3}, {"recall@20": 0.25}, None, gate, force=True)
    assert forced.accepted and forced.reason.startswith("forced (would fail")


# -- publish / rollback ----------------------------------------------------------------------
N_USERS, N_ITEMS, K = 6, 5, 3


def staged_model(models_dir: Path, version: str, seed: int) -> TrainedModel:
    rng = np.random.default_rng(seed)
    ui = sp.csr_matrix(np.array([[1, 0, 2, 0, 0], [0, 1, 0, 0, 3], [1, 1, 0, 0, 0],
                                 [0, 0, 0, 1, 0], [2, 0, 0, 1, 0], [0, 0, 1, 0, 1]],
                                dtype=np.float64))
    model = TrainedModel(
        version=version, backend="implicit", as_of=date(2026, 3, 3),
        params={"factors": K, "regularization": 0.05, "iterations": 3, "alpha": 1.0},
        foldin=FoldInParams.for_backend("implicit", alpha=1.0, regularization=0.05),
        user_ids=np.array([f"u{i}" for i in range(N_USERS)]),
        item_ids=np.array([f"i{j}" for j in range(N_ITEMS)]),
        user_factors=rng.normal(size=(N_USERS, K)), item_factors=rng.normal(size=(N_ITEMS, K)),
        user_items=ui, item_popularity=np.asarray(ui.sum(axis=0)).ravel(),
    )
    save_staged(models_dir, model)
    return model


def stage(models_dir: Path, version: str, als: float, pop: float = 0.20, seed: int = 0):
    model = staged_model(models_dir, version, seed)
    save_metrics(models_dir, version, {
        "split": "time", "k": [10], "n_test_users": 6,
        "models": {"als": {"ndcg@10": als, "recall@10": als}, "popularity": {"ndcg@10": pop},
                   "ease": {"ndcg@10": 0.33}},
        "report": "r.md",
    })
    return model


@pytest.fixture()
def settings(tmp_path):
    return load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                            "model": {"dir": str(tmp_path / "models")}})


def snapshot(lake: Lake) -> dict[str, list]:
    out = {}
    for name, key in (("model_runs", "model_version"), ("user_factors", "user_id"),
                      ("item_factors", "item_id")):
        rows = lake.read(name).to_pylist()
        out[name] = sorted(rows, key=lambda r: (r["model_version"], r[key]))
    return out


def runs(lake: Lake) -> dict[str, dict]:
    return {r["model_version"]: r for r in lake.read("model_runs").to_pylist()}


def test_publish_writes_bundle_tables_and_current_and_rerun_is_identical(settings):
    models = settings.model.dir
    lake = Lake.from_settings(settings.lake)
    model = stage(models, "v1", als=0.30)

    res = publish.run(settings, version="v1")
    assert res["accepted"] and res["status"] == "current" and not res["bundle_reused"]
    assert current_version(models) == "v1"
    bundle = read_bundle(models / "v1")
    np.testing.assert_array_equal(bundle.item_factors, model.item_factors)
    assert bundle.manifest.metrics["models"]["als"]["ndcg@10"] == 0.30

    snap = snapshot(lake)
    uf = {r["user_id"]: r["factors"] for r in snap["user_factors"]}
    assert len(uf) == N_USERS and {r["model_version"] for r in snap["user_factors"]} == {"v1"}
    np.testing.assert_allclose(np.array([uf[f"u{i}"] for i in range(N_USERS)]),
                               model.user_factors)
    assert len(snap["item_factors"]) == N_ITEMS
    (row,) = snap["model_runs"]
    assert row["status"] == "current" and row["backend"] == "implicit"
    assert row["bundle_path"] == str(models / "v1")
    assert json.loads(row["metrics"])["models"]["popularity"]["ndcg@10"] == 0.20
    assert json.loads(row["params"])["factors"] == K

    again = publish.run(settings, version="v1")
    assert again["accepted"] and again["bundle_reused"]
    assert snapshot(lake) == snap
    assert current_version(models) == "v1"
    assert list_versions(models) == ["v1"]


def test_bad_model_rejected_then_rollback(settings, capsys):
    models = settings.model.dir
    lake = Lake.from_settings(settings.lake)
    stage(models, "v1", als=0.30, seed=1)
    stage(models, "v2", als=0.31, seed=2)
    stage(models, "v3", als=0.05, seed=3)  # far below popularity (0.20)
    assert publish.run(settings, version="v1")["status"] == "current"
    assert publish.run(settings, version="v2")["status"] == "current"
    assert current_version(models) == "v2"
    assert runs(lake)["v1"]["status"] == "published"

    res = publish.run(settings, version="v3")
    assert not res["accepted"] and res["status"] == "rejected"
    assert "0.0500 < popularity 0.2000" in res["reason"]
    assert current_version(models) == "v2"  # unchanged
    assert "v3" in list_versions(models)  # bundle kept for inspection
    r = runs(lake)
    assert r["v3"]["status"] == "rejected" and r["v2"]["status"] == "current"
    assert {x["model_version"] for x in lake.read("item_factors").to_pylist()} == {
        "v1", "v2", "v3"}

    # a rerun keeps the recorded decision; nothing changes
    before = snapshot(lake)
    assert publish.run(settings, version="v3")["status"] == "rejected"
    assert snapshot(lake) == before

    # rollback: rejected and unknown versions are refused with a clear message
    with pytest.raises(RollbackError, match="rejected"):
        rollback.run(settings, version="v3")
    with pytest.raises(RollbackError, match="unknown model version 'nope'"):
        rollback.run(settings, version="nope")

    out = rollback.run(settings)  # default: newest published version before CURRENT
    assert out["version"] == "v1" and out["previous_current"] == "v2"
    assert current_version(models) == "v1"
    r = runs(lake)
    assert r["v1"]["status"] == "current" and r["v2"]["status"] == "rolled_back"
    assert r["v3"]["status"] == "rejected"

    # rerunning v2's publish does not undo the rollback
    assert publish.run(settings, version="v2")["status"] == "rolled_back"
    assert current_version(models) == "v1"

    # --force publishes even the rejected one
    forced = publish.run(settings, version="v3", force=True)
    assert forced["accepted"] and forced["reason"].startswith("forced (would fail")
    assert current_version(models) == "v3"
    assert runs(lake)["v1"]["status"] == "published"


def test_cli_errors_are_one_line_and_exit_2(settings, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAMBDAREC__LAKE__ROOT", str(tmp_path / "lake"))
    monkeypatch.setenv("LAMBDAREC__MODEL__DIR", str(tmp_path / "models"))
    stage(settings.model.dir, "v1", als=0.30)
    assert rollback.main(["--version", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model version 'nope'" in err and err.count("\n") == 1
    assert publish.main(["--version", "missing"]) == 2
    assert "no staged model 'missing'" in capsys.readouterr().err
    assert publish.main(["--version", "v1"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["version"] == "v1" and line["accepted"] is True


# -- a rerun after `train` ran again (a cleared Airflow task): one source for everything ---
def factor_rows(lake: Lake, table: str, key: str, version: str) -> dict[str, list[float]]:
    return {r[key]: r["factors"] for r in lake.read(table).to_pylist()
            if r["model_version"] == version}


def test_a_served_version_is_never_republished_from_a_retrained_staging(settings):
    models = settings.model.dir
    lake = Lake.from_settings(settings.lake)
    stage(models, "v1", als=0.30, seed=1)
    assert publish.run(settings, version="v1")["status"] == "current"
    served = read_bundle(models / "v1")
    before = snapshot(lake)

    stage(models, "v1", als=0.35, seed=2)  # train and evaluate of the same run ran again
    with pytest.raises(JobError, match=r"^v1 was published \(status current\) from another "
                                       r"model than its staging holds now"):
        publish.run(settings, version="v1")
    assert snapshot(lake) == before  # factor tables and model_runs untouched...
    np.testing.assert_array_equal(read_bundle(models / "v1").item_factors, served.item_factors)
    rows = factor_rows(lake, "item_factors", "item_id", "v1")  # ...and still the bundle's
    np.testing.assert_allclose(np.array([rows[f"i{j}"] for j in range(N_ITEMS)]),
                               served.item_factors)
    assert current_version(models) == "v1"


def test_a_rejected_version_retrained_is_published_again_all_from_its_new_staging(settings):
    models = settings.model.dir
    lake = Lake.from_settings(settings.lake)
    stage(models, "v1", als=0.05, seed=1)  # far below popularity (0.20)
    assert publish.run(settings, version="v1")["status"] == "rejected"

    retrained = stage(models, "v1", als=0.30, seed=2)  # train and evaluate ran again
    res = publish.run(settings, version="v1")
    assert res["status"] == "current" and res["accepted"] and not res["bundle_reused"]
    assert current_version(models) == "v1"
    bundle = read_bundle(models / "v1")  # the new model, in the bundle...
    np.testing.assert_array_equal(bundle.item_factors,
                                  retrained.item_factors.astype(np.float32))
    np.testing.assert_array_equal(bundle.user_factors,
                                  retrained.user_factors.astype(np.float32))
    for table, key, ids, factors in (("item_factors", "item_id", bundle.item_ids,
                                      bundle.item_factors),
                                     ("user_factors", "user_id", bundle.user_ids,
                                      bundle.user_factors)):
        rows = factor_rows(lake, table, key, "v1")  # ...the factor tables...
        assert sorted(rows) == sorted(ids.tolist())
        np.testing.assert_array_equal(np.array([rows[i] for i in ids], np.float32), factors)
    (run,) = lake.read("model_runs").to_pylist()  # ...and the row, with its new decision
    assert run["status"] == "current" and "0.3000" in run["gate_reason"]
    assert json.loads(run["metrics"])["models"]["als"]["ndcg@10"] == 0.30
    assert bundle.manifest.metrics["models"]["als"]["ndcg@10"] == 0.30

    again = publish.run(settings, version="v1")  # a plain retry of that: nothing changes
    assert again["bundle_reused"] and again["status"] == "current"
