"""DAG tests (STYLE.md #14): import cleanly, nothing heavy at parse time, structure, and one
`dag.test()` run of `lambdarec_retrain` end to end on tiny synthetic data.

Airflow reads its configuration once per process, so everything that needs a metadata DB
runs in a subprocess with its own AIRFLOW_HOME; the in-process checks only parse DAG files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tiny_pipeline import tiny_pipeline_env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGS = PROJECT_ROOT / "dags"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if p.name != "lambdarec_common.py")
HEAVY = ("pyspark", "implicit", "faiss", "numpy", "pandas", "deltalake", "grpc", "scipy")

# Parsing DAGs imports airflow, which reads its config on import: never ~/airflow.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="lambdarec-airflow-parse-")
os.environ.setdefault("AIRFLOW_HOME", _AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")


def _airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "LAMBDAREC__", "PYTEST_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(PROJECT_ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dagbag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


# --------------------------------------------------------------------------- import + parse


def test_every_dag_file_imports_without_errors(dagbag: Any) -> None:
    assert DAG_FILES, "no DAG files found"
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"lambdarec_erasure", "lambdarec_experiments",
                                   "lambdarec_retrain", "lambdarec_rollback"}


def test_helper_module_is_ignored_by_the_dag_processor() -> None:
    ignore = (DAGS / ".airflowignore").read_text().split()
    assert "lambdarec_common.py" in ignore


def test_parsing_imports_nothing_heavy(tmp_path: Path) -> None:
    """Parse every DAG file in a fresh interpreter and look at what got imported."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        t0 = time.perf_counter()
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(DAGS)!r})
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print(json.dumps({{"errors": bag.import_errors, "dags": sorted(bag.dag_ids),
                          "heavy": heavy, "seconds": time.perf_counter() - t0}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], env=_airflow_env(tmp_path),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] == ["lambdarec_erasure", "lambdarec_experiments", "lambdarec_retrain",
                              "lambdarec_rollback"]
    assert result["heavy"] == [], f"imported at parse time: {result['heavy']}"
    assert result["seconds"] < 30


# --------------------------------------------------------------------------- structure


def test_every_dag_has_tags_docs_retries_and_no_catchup(dagbag: Any) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert "lambdarec" in dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 200, dag_id
        assert dag.catchup is False, dag_id
        assert dag.max_active_runs == 1, dag_id
        for t in dag.tasks:
            assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"
            assert t.doc_md, f"{dag_id}.{t.task_id} has no doc_md"
            assert t.execution_timeout is not None, f"{dag_id}.{t.task_id}"


def test_retrain_task_order(dagbag: Any) -> None:
    dag = dagbag.dags["lambdarec_retrain"]
    upstream = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert upstream == {
        "plan": [],
        "coalesce_bronze": ["plan"],
        "compact": ["coalesce_bronze"],
        "tune": ["compact", "plan"],
        "interactions": ["tune"],
        "train": ["interactions"],
        "evaluate": ["train"],
        "publish": ["evaluate", "plan"],
        "notify_reload": ["publish"],
    }


def test_retrain_is_nightly(dagbag: Any) -> None:
    dag = dagbag.dags["lambdarec_retrain"]
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 0 * * *"


def test_retrain_params_and_their_validation(dagbag: Any) -> None:
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    from lake.config import load_settings

    cfg = load_settings()
    params = dagbag.dags["lambdarec_retrain"].params
    assert {"backend", "factors", "regularization", "iterations", "alpha",
            "gate_margin", "force_publish", "as_of", "tune", "tune_budget_s"} <= set(params.keys())
    assert (params["tune"], params["tune_budget_s"]) == (cfg.tune.enabled, cfg.tune.budget_s)
    # Defaults come from the project settings, so the trigger form shows the real config.
    assert (params["backend"], params["factors"], params["iterations"]) == (
        cfg.train.backend, cfg.train.factors, cfg.train.iterations)
    assert params["gate_margin"] == cfg.gate.min_lift_over_popularity
    assert params["force_publish"] is False
    assert params["as_of"] is None

    ok = copy.deepcopy(params)
    ok.update({"backend": "mllib", "factors": 8, "as_of": "2026-11-01"})
    ok.validate()
    for bad in ({"backend": "svd"}, {"factors": 0}, {"tune_budget_s": 0},
                {"force_publish": "yes"}, {"alpha": 0}):
        p = copy.deepcopy(params)
        with pytest.raises(ParamValidationError):
            p.update(bad)
            p.validate()


def test_spark_tasks_submit_the_job_files_with_the_run_arguments(dagbag: Any) -> None:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from lake.config import load_settings

    conn_id = load_settings().airflow.spark_conn_id
    dag = dagbag.dags["lambdarec_retrain"]
    expected_args = {
        "compact": [],  # incremental: the dates bronze commits changed
        "interactions": ["--as-of", "--version"],
        "train": ["--as-of", "--version", "--backend", "--factors", "--regularization",
                  "--iterations", "--alpha"],
        "evaluate": ["--as-of", "--version", "--gate-margin"],  # the report's gate line
    }
    for task_id, flags in expected_args.items():
        t = dag.get_task(task_id)
        assert isinstance(t, SparkSubmitOperator)
        assert t.application == str(PROJECT_ROOT / "spark_jobs" / f"{task_id}.py")
        assert t._conn_id == conn_id
        assert [a for a in t.application_args if a.startswith("--")] == flags
    train = dag.get_task("train")
    assert "{{ params.backend }}" in train.application_args
    assert "xcom_pull(task_ids='plan')['version']" in " ".join(train.application_args)


def test_rollback_dag(dagbag: Any) -> None:
    dag = dagbag.dags["lambdarec_rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert "version" in dag.params
    assert {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} == {
        "rollback": [], "notify_reload": ["rollback"]}


# --------------------------------------------------------------------------- run plan


def test_plan_version_is_a_function_of_the_run_only(tmp_path: Path) -> None:
    from dags.lambdarec_common import plan_run

    ld = datetime(2026, 11, 21, tzinfo=UTC)
    kw: dict[str, Any] = dict(dag_id="lambdarec_retrain", logical_date=ld, run_after=ld,
                              models_dir=tmp_path)
    a = plan_run(run_id="scheduled__2026-11-21", params={}, **kw)
    again = plan_run(run_id="scheduled__2026-11-21", params={}, **kw)
    other = plan_run(run_id="manual__2026-11-22T10:00", params={}, **kw)
    assert a == again
    assert a["version"] != other["version"]
    assert a["version"].startswith("v20261121-")
    assert a["as_of"] == "2026-11-21"
    assert a["report"] == str(tmp_path / "reports" / a["version"] / "report.md")


def test_plan_dates_for_manual_runs_and_overrides(tmp_path: Path) -> None:
    from dags.lambdarec_common import plan_run

    after = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)
    manual = plan_run(dag_id="d", run_id="manual__x", logical_date=None, run_after=after,
                      params={}, models_dir=tmp_path)
    assert manual["as_of"] == "2026-11-21"  # the last complete UTC day
    forced = plan_run(dag_id="d", run_id="manual__x", logical_date=None, run_after=after,
                      params={"as_of": "2026-10-05"}, models_dir=tmp_path)
    assert forced["as_of"] == "2026-10-05"
    with pytest.raises(ValueError, match="as_of"):
        plan_run(dag_id="d", run_id="r", logical_date=None, run_after=after,
                 params={"as_of": "yesterday"}, models_dir=tmp_path)


def test_spark_connection_master_reaches_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from dags.lambdarec_common import spark_job_env

    env = spark_job_env("spark://127.0.0.1:7077", {"PYTHONPATH": "/x", "PATH": "/usr/bin"})
    assert env["LAMBDAREC__SPARK__MASTER"] == "spark://127.0.0.1:7077"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT), "/x"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYSPARK_PYTHON"] == sys.executable


def test_notify_reload_never_raises_for_an_unreachable_server() -> None:
    from dags.lambdarec_common import notify_reload

    out = notify_reload(["127.0.0.1:1"], "token", "v1", timeout_s=1.0)
    assert set(out["targets"]) == {"127.0.0.1:1"}
    assert out["targets"]["127.0.0.1:1"].split(":")[0] in ("unreachable", "skipped")


def test_a_rejected_model_skips_the_reload_instead_of_failing(dagbag: Any) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    notify = dagbag.dags["lambdarec_retrain"].get_task("notify_reload").python_callable
    with pytest.raises(AirflowSkipException, match="ndcg@10 below popularity"):
        notify({"accepted": False, "version": "v1", "reason": "ndcg@10 below popularity"})


def test_notify_reload_makes_a_running_server_serve_the_new_version(tmp_path: Path) -> None:
    """A real online server (port 0): the DAG's notify step swaps its model; a wrong token
    is an error (fails the task), a dead server only a warning."""
    import online_bundles as kb

    from dags.lambdarec_common import notify_reload
    from lake.config import load_settings
    from online.server import create_server

    token = "dag-test-token"
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")},
        "model": {"dir": str(tmp_path / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": token, "wal_dir": str(tmp_path / "wal")},
    })
    kb.build(Path(settings.model.dir), "v1")
    server, ports = create_server(settings, metrics=False)
    server.start()
    try:
        assert server.manager.current.version == "v1"
        kb.build(Path(settings.model.dir), "v2")  # what publish does: bundle + CURRENT
        admin = f"127.0.0.1:{ports['admin']}"
        out = notify_reload([admin, "127.0.0.1:1"], token, "v2", timeout_s=10)
        assert out["targets"][admin].startswith("ok"), out
        assert out["targets"]["127.0.0.1:1"].startswith("unreachable"), out
        assert server.manager.current.version == "v2"
        with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
            notify_reload([admin], "wrong-token", "v2", timeout_s=10)
    finally:
        server.stop(grace=1)


# --------------------------------------------------------------------------- end to end

E2E_SCRIPT = r"""
import json, sys, time
from datetime import datetime, timedelta
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

logical_date = datetime.fromisoformat(sys.argv[1])
conf = json.loads(sys.argv[2])
bag = DagBag(dag_folder=sys.argv[3])
assert not bag.import_errors, bag.import_errors


def run(dag_id, **kwargs):
    dag = bag.dags[dag_id]
    t0 = time.perf_counter()
    dr = dag.test(**kwargs)
    seconds = time.perf_counter() - t0
    with create_session() as s:
        tis = s.query(TaskInstance).filter(TaskInstance.dag_id == dag_id,
                                           TaskInstance.run_id == dr.run_id).all()
        states = {ti.task_id: str(ti.state) for ti in tis}
        xcoms = {f"{x.task_id}.{x.key}": x.value for x in s.query(XComModel).filter(
            XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id).all()}
    return {"state": str(dr.state), "run_id": dr.run_id, "states": states, "xcoms": xcoms,
            "seconds": seconds}


first = run("lambdarec_retrain", logical_date=logical_date, run_conf=conf)
version = first["xcoms"].get("plan.return_value", {}).get("version")
rollback = run("lambdarec_rollback", logical_date=None, run_conf={"version": version})
# The day before, a gate no model can pass (+10000% over popularity), no tuning: rejected.
rejected = run("lambdarec_retrain", logical_date=logical_date - timedelta(days=1),
               run_conf={**conf, "gate_margin": 100.0, "tune": False})
print("E2E-RESULT " + json.dumps({"first": first, "rollback": rollback, "rejected": rejected},
                                 default=str))
"""


@pytest.mark.slow
def test_retrain_dag_end_to_end_publishes_a_model(tmp_path: Path) -> None:
    """`dag.test()` on 20k synthetic events: every task succeeds and CURRENT = the version;
    a run whose model the gate rejects fails `publish` with the reason."""
    home = tmp_path / "airflow"
    home.mkdir()
    models = tmp_path / "models"
    lake_env = tiny_pipeline_env(tmp_path) | {"LAMBDAREC__SPARK__MASTER": "local[2]"}
    env = _airflow_env(
        home,
        AIRFLOW_CONN_SPARK_DEFAULT=json.dumps({"conn_type": "spark", "host": "local[2]"}),
        **lake_env,
    )
    seed = subprocess.run([sys.executable, "-m", "lake.load"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr[-3000:]
    migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    # Synthetic events cover the 30 UTC days up to yesterday.
    as_of = date.today() - timedelta(days=1)
    logical = datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC)
    conf = {"factors": 16, "iterations": 5, "regularization": 0.05,
            "alpha": 2.0, "backend": "implicit", "gate_margin": -0.9, "force_publish": False}
    out = subprocess.run(
        [sys.executable, "-c", E2E_SCRIPT, logical.isoformat(), json.dumps(conf), str(DAGS)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("E2E-RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-6000:] + out.stderr[-6000:])
    results = json.loads(lines[-1][len("E2E-RESULT "):])
    result = results["first"]
    log_tail = out.stdout[-8000:] + out.stderr[-4000:]
    assert result["states"] == {
        "plan": "success", "coalesce_bronze": "success", "compact": "success",
        "tune": "success", "interactions": "success",
        "train": "success", "evaluate": "success", "publish": "success",
        "notify_reload": "success",
    }, log_tail
    assert result["state"] == "success"

    plan = result["xcoms"]["plan.return_value"]
    version = plan["version"]
    assert plan["as_of"] == as_of.isoformat()
    compacted = result["xcoms"]["compact.return_value"]
    assert (compacted["mode"], compacted["dates"]) == ("full", 30)  # the first compaction
    published = result["xcoms"]["publish.return_value"]
    assert published["accepted"] is True and published["version"] == version
    assert (models / "CURRENT").read_text().strip() == version
    assert (models / version / "manifest.json").exists()
    report = Path(result["xcoms"]["evaluate.report"])
    assert report == models / "reports" / version / "report.md"
    assert report.exists() and report.stat().st_size > 0
    assert result["xcoms"]["train.return_value"]["version"] == version
    tuned = result["xcoms"]["tune.return_value"]
    assert tuned["version"] == version and tuned["trials"] >= 1
    assert Path(tuned["tuning"]).exists()
    reload = result["xcoms"]["notify_reload.return_value"]["targets"]["127.0.0.1:1"]
    assert reload.startswith(("unreachable", "skipped")), reload

    rollback = results["rollback"]
    assert rollback["states"] == {"rollback": "success", "notify_reload": "success"}, \
        log_tail
    assert rollback["xcoms"]["rollback.return_value"]["version"] == version
    rejected = results["rejected"]
    assert rejected["state"] == "failed", log_tail  # red in the grid, unlike the run above
    assert rejected["states"]["publish"] == "failed"
    assert rejected["states"]["notify_reload"] == "upstream_failed"
    gate = rejected["xcoms"]["publish.gate"]
    assert gate["accepted"] is False and "popularity" in gate["reason"]
    assert (models / "CURRENT").read_text().strip() == version  # unchanged
    assert (f"model {gate['version']} rejected by the gate, CURRENT stays {version}: "
            f"{gate['reason']}") in out.stdout + out.stderr  # the failed task's error
    print(f"dag.test() end to end: retrain {result['seconds']:.1f} s, rollback "
          f"{rollback['seconds']:.1f} s, version {version}")
