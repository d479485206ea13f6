"""The `lambdarec_experiments` DAG (STYLE.md #14): structure, the jobs it submits, the
report's plot, and one `dag.test()` run end to end on a tiny lake (attribution, analysis
and report, with the real spark-submit of the jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGS = PROJECT_ROOT / "dags"

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="lambdarec-airflow-parse-")
os.environ.setdefault("AIRFLOW_HOME", _AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")


@pytest.fixture(scope="module")
def dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["lambdarec_experiments"]


def test_structure_schedule_and_retries(dag: Any) -> None:
    assert {"lambdarec", "experiments"} <= set(dag.tags)
    assert {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} == {
        "plan": [], "compact": ["plan"], "attribution": ["compact"],
        "analysis": ["attribution", "plan"], "report": ["analysis", "plan"]}
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 2 * * *"  # after the nightly retrain (00:00)
    assert all(t.retries >= 1 and t.doc_md for t in dag.tasks)
    assert dag.params["as_of"] is None


def test_the_spark_tasks_submit_the_jobs_for_the_planned_date(dag: Any) -> None:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    att = dag.get_task("attribution")
    assert isinstance(att, SparkSubmitOperator)
    assert att.application == str(PROJECT_ROOT / "spark_jobs" / "attribution.py")
    assert att.application_args == ["--as-of", "{{ ti.xcom_pull(task_ids='plan')['as_of'] }}"]
    assert dag.get_task("compact").application == str(PROJECT_ROOT / "spark_jobs" /
                                                       "compact.py")


def test_report_plots_each_arm_and_the_lift_over_time(tmp_path: Path) -> None:
    from spark_jobs.experiment_report import over_time

    rows = []
    for d in range(3):
        for arm, v in (("control", 0.10), ("challenger", 0.12)):
            rows.append({"as_of": date(2026, 11, 20) + timedelta(d), "arm": arm,
                         "control_arm": "control", "metric": "ctr", "value": v + 0.001 * d,
                         "ci_lower": v - 0.01, "ci_upper": v + 0.01,
                         "rel_lift": None if arm == "control" else 0.2,
                         "rel_lift_ci_lower": None if arm == "control" else 0.05,
                         "rel_lift_ci_upper": None if arm == "control" else 0.35})
    fig = over_time(rows, "ctr", experiment="exp-1")
    left, right = fig.axes
    assert "exp-1" in fig._suptitle.get_text()
    assert [ln.get_label() for ln in left.get_lines()] == ["control", "challenger"]
    assert [ln.get_label() for ln in right.get_lines()][0] == "challenger vs control"
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([20.0, 20.0, 20.0])
    assert right.get_lines()[0].get_color() == left.get_lines()[1].get_color()  # one per arm


E2E_SCRIPT = r"""
import json, sys
from datetime import datetime
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

bag = DagBag(dag_folder=sys.argv[2])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["lambdarec_experiments"]
dr = dag.test(logical_date=datetime.fromisoformat(sys.argv[1]))
with create_session() as s:
    tis = s.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                       TaskInstance.run_id == dr.run_id).all()
    states = {ti.task_id: str(ti.state) for ti in tis}
    xcoms = {f"{x.task_id}.{x.key}": x.value for x in s.query(XComModel).filter(
        XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id).all()}
print("E2E-RESULT " + json.dumps({"state": str(dr.state), "states": states, "xcoms": xcoms},
                                 default=str))
"""


def _airflow_env(home: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "LAMBDAREC__", "PYTEST_"))}
    env.update(
        AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW_CONN_SPARK_DEFAULT=json.dumps({"conn_type": "spark", "host": "local[2]"}),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(PROJECT_ROOT),
        LAMBDAREC__LAKE__ROOT=str(tmp_path / "lake"),
        LAMBDAREC__MODEL__DIR=str(tmp_path / "models"),
        LAMBDAREC__SERVER__WAL_DIR=str(tmp_path / "wal"),
        LAMBDAREC__SPARK__MASTER="local[2]", LAMBDAREC__SPARK__DRIVER_MEMORY="1g",
        LAMBDAREC__SPARK__SHUFFLE_PARTITIONS="2",
        LAMBDAREC__EXPERIMENTS__MIN_USERS_PER_ARM="10",
        OPENBLAS_NUM_THREADS="1",
    )
    return env


def _seed(lake_root: Path, day: date) -> tuple[str, int]:
    """Items, events and lists of one experiment on `day`: the challenger's users click
    their first item, a fifth of the control's; returns the experiment id and the clicks."""
    import pyarrow as pa

    from lake import schemas
    from lake.config import load_settings
    from lake.experiments import ExperimentStore, assign, experiments_file, new_experiment
    from lake.tables import Lake

    lake = Lake(lake_root)
    start = datetime(day.year, day.month, day.day, 6, tzinfo=UTC)
    exp = new_experiment("homepage", [{"name": "control", "share": 0.5},
                                      {"name": "challenger", "share": 0.5}],
                         salt="dag-test", now=start)
    settings = load_settings(env={}, overrides={"lake": {"root": str(lake_root)}})
    ExperimentStore(experiments_file(settings)).create(exp)
    spec = schemas.BRONZE_IMPRESSIONS
    lists, events = [], []
    for u in range(60):
        user, arm = f"u{u}", assign(exp, f"u{u}")
        ts = start + timedelta(minutes=u)
        rec = f"rec{u}"
        lists.append({"recommendation_id": rec, "tenant": "", "surface": "recommend",
                      "user_id": user, "anchor_item_id": None,
                      "items": [{"item_id": f"i{j}", "position": j, "score": 1.0}
                                for j in range(5)],
                      "model_version": "v1", "strategy": "personalised",
                      "experiment_id": exp.experiment_id, "arm": arm, "context": "{}",
                      "ts": ts, "impression_date": day})
        if arm == "challenger" or u % 5 == 0:
            events.append({"event_id": f"e{u}", "user_id": user, "item_id": "i0",
                           "event_type": "click", "value": None, "ts": ts + timedelta(seconds=30),
                           "received_at": ts + timedelta(seconds=31), "session_id": None,
                           "properties": None, "event_date": day, "tenant": ""})
    lake.append("bronze_impressions", pa.Table.from_pylist(lists, schema=spec.schema))
    lake.append("bronze_events", pa.Table.from_pylist(events))
    lake.append("items", pa.table({
        "item_id": [f"i{j}" for j in range(5)], "category": ["c"] * 5,
        "price": [10.0] * 5, "available": [True] * 5, "title": [None] * 5,
        "updated_at": [start] * 5}).cast(schemas.ITEMS.schema))
    return exp.experiment_id, len(events)


@pytest.mark.slow
def test_dag_attributes_analyses_and_reports_end_to_end(tmp_path: Path) -> None:
    day = date(2026, 11, 20)
    exp_id, clicks = _seed(tmp_path / "lake", day)
    home = tmp_path / "airflow"
    home.mkdir()
    env = _airflow_env(home, tmp_path)
    migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    logical = datetime(day.year, day.month, day.day, tzinfo=UTC)
    out = subprocess.run([sys.executable, "-c", E2E_SCRIPT, logical.isoformat(), str(DAGS)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("E2E-RESULT ")]
    log_tail = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0 and lines, log_tail
    result = json.loads(lines[-1][len("E2E-RESULT "):])
    assert result["states"] == {t: "success" for t in
                                ("plan", "compact", "attribution", "analysis", "report")}, \
        log_tail
    attributed = result["xcoms"]["attribution.return_value"]
    assert attributed["attributed"] == attributed["window"] == clicks
    analysis = result["xcoms"]["analysis.return_value"]["experiments"][exp_id]
    assert analysis["status"] == "decided" and analysis["decisions"] == {"challenger": "better"}
    assert sum(analysis["users"].values()) == 60
    report = Path(result["xcoms"]["report.return_value"]["report"])
    assert report.exists() and "homepage" in report.read_text()
    assert (report.parent / f"{exp_id}.png").stat().st_size > 0
