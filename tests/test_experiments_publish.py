"""The nightly publish into an experiment (`spark_jobs.publish.run(into_experiment=...)`): an
accepted challenger is staged beside the champion and run against it, a retry changes
nothing, the next challenger replaces the experiment, promotion and rollback are one command
each; and the retrain DAG's params and its skipped reload."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_publish import stage

from lake import rollback
from lake.bundle import current_version, list_versions
from lake.config import load_settings
from lake.experiments import ExperimentStore, experiments_file, promote
from lake.model_runs import model_runs
from lake.tables import Lake
from spark_jobs import publish
from spark_jobs.cli import JobError

DAGS = Path(__file__).resolve().parent.parent / "dags"


@pytest.fixture()
def settings(tmp_path: Path) -> Any:
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "publish": {"challenger_share": 0.25}})


def test_an_accepted_model_becomes_the_challenger_not_current(settings: Any) -> None:
    models = Path(settings.model.dir)
    lake = Lake.from_settings(settings.lake)
    store = ExperimentStore(experiments_file(settings))
    stage(models, "v1", als=0.30, seed=1)
    stage(models, "v2", als=0.31, seed=2)
    stage(models, "v3", als=0.32, seed=3)

    first = publish.run(settings, version="v1", into_experiment="nightly")
    assert first["status"] == "current" and first["experiment"] is None  # no champion yet
    assert store.load() == []

    res = publish.run(settings, version="v2", into_experiment="nightly")
    assert res["accepted"] and res["status"] == "published"
    assert current_version(models) == "v1"  # the champion keeps serving everyone else
    assert "v2" in list_versions(models)
    exp = store.running()
    assert exp is not None and res["experiment"]["experiment_id"] == exp.experiment_id
    assert exp.name == "nightly" and exp.traffic == 1.0
    assert [(a.name, a.model_version, a.share) for a in exp.arms] == [
        ("champion", "v1", 0.75), ("challenger", "v2", 0.25)]
    runs = model_runs(lake)
    assert (runs["v1"]["status"], runs["v2"]["status"]) == ("current", "published")

    again = publish.run(settings, version="v2", into_experiment="nightly")  # a retried task
    assert again["experiment"]["experiment_id"] == exp.experiment_id
    assert len(store.load()) == 1 and current_version(models) == "v1"

    nxt = publish.run(settings, version="v3", into_experiment="nightly")  # the next night
    replaced = store.get(exp.experiment_id)
    assert replaced.state == "stopped"
    new = store.running()
    assert new is not None and new.experiment_id == nxt["experiment"]["experiment_id"]
    assert [a.model_version for a in new.arms] == ["v1", "v3"]
    assert new.salt != exp.salt

    # promotion and rollback: one command each
    out = promote(settings, new.experiment_id, "challenger")
    assert (out["previous_current"], out["current"]) == ("v1", "v3")
    assert store.running() is None and current_version(models) == "v3"
    assert rollback.run(settings)["version"] == "v2"  # the newest published before v3
    assert rollback.run(settings, version="v1")["current"] == "v1"


def test_a_rejected_model_starts_no_experiment(settings: Any) -> None:
    models = Path(settings.model.dir)
    stage(models, "v1", als=0.30, seed=1)
    stage(models, "v2", als=0.05, seed=2)  # far below popularity
    publish.run(settings, version="v1")
    res = publish.run(settings, version="v2", into_experiment="nightly")
    assert not res["accepted"] and res["status"] == "rejected" and res["experiment"] is None
    assert ExperimentStore(experiments_file(settings)).load() == []
    assert current_version(models) == "v1"


def test_an_experiment_the_servers_could_not_hold_fails_publish_and_stops_nothing(
        tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "server": {"max_models": 1}})
    models = Path(settings.model.dir)
    stage(models, "v1", als=0.30, seed=1)
    stage(models, "v2", als=0.31, seed=2)
    publish.run(settings, version="v1")
    with pytest.raises(JobError, match="v2 is published but not in experiment 'nightly': the "
                                       "experiment needs 2 models in memory .* above "
                                       "server.max_models 1"):
        publish.run(settings, version="v2", into_experiment="nightly")
    assert current_version(models) == "v1"


# -- the DAG -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrain() -> Any:
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="lambdarec-airflow-exp-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS)).dags["lambdarec_retrain"]


def test_the_retrain_dag_takes_the_experiment_params(retrain: Any) -> None:
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    cfg = load_settings()
    params = retrain.params
    assert params["into_experiment"] == cfg.publish.into_experiment
    assert params["challenger_share"] == cfg.publish.challenger_share
    ok = copy.deepcopy(params)
    ok.update({"into_experiment": "nightly", "challenger_share": 0.1})
    ok.validate()
    for bad in ({"challenger_share": 1.0}, {"challenger_share": 0}):
        p = copy.deepcopy(params)
        with pytest.raises(ParamValidationError):
            p.update(bad)
            p.validate()


def test_no_reload_after_publishing_into_an_experiment(retrain: Any) -> None:
    """A reload of the challenger's version would make it everybody's model."""
    from airflow.sdk.exceptions import AirflowSkipException

    notify = retrain.get_task("notify_reload").python_callable
    with pytest.raises(AirflowSkipException, match="challenger of experiment exp-1"):
        notify({"accepted": True, "version": "v2",
                "experiment": {"experiment_id": "exp-1"}})
