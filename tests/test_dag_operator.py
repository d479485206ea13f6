"""The DAGs' Spark task through the provider's public API only: the connection's master,
the job's result file, a real spark-submit."""

from __future__ import annotations

import ast
import json
import os
import tempfile
from datetime import date
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGS = PROJECT_ROOT / "dags"

# Importing airflow reads its config once: never ~/airflow (as tests/test_dags.py).
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="lambdarec-airflow-op-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")


def test_the_dags_reach_no_private_member_of_anything() -> None:
    # `x._name` is someone's internals (the provider's operator and hook above all): the
    # DAG code keeps to what the provider lets callers set and call.
    found = []
    for path in sorted(DAGS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("connection", "master"), [
    ({"conn_type": "spark", "host": "local[2]"}, "local[2]"),
    ({"conn_type": "spark", "host": "yarn"}, "yarn"),
    # as `infra.airflow_standalone.spark_connection` writes a standalone cluster's
    ({"conn_type": "spark", "host": "spark://127.0.0.1", "port": 7077}, "spark://127.0.0.1:7077"),
    ({"conn_type": "spark", "host": "10.0.0.5", "port": 7077}, "spark://10.0.0.5:7077"),
    ("spark://10.0.0.5:7077", "spark://10.0.0.5:7077"),  # the URI form
])
def test_connection_master(connection: object, master: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from dags.lambdarec_common import connection_master

    value = connection if isinstance(connection, str) else json.dumps(connection)
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDAREC_MASTER_TEST", value)
    assert connection_master("lambdarec_master_test") == master


def test_a_missing_connection_means_yarn_as_for_spark_submit() -> None:
    from dags.lambdarec_common import connection_master

    assert connection_master("lambdarec_no_such_connection") == "yarn"


def test_result_file_holds_the_line_the_job_prints(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from spark_jobs.cli import job_parser, run_main

    out = tmp_path / "result.json"
    parser = job_parser("spark_jobs.example", "An example job.")
    code = run_main(parser, ["--result-file", str(out)],
                    lambda args: {"job": "example", "as_of": date(2026, 11, 21), "n": 3})
    assert code == 0
    line = '{"as_of": "2026-11-21", "job": "example", "n": 3}\n'
    assert out.read_text() == line
    assert capsys.readouterr().out == line


def test_no_result_file_when_the_job_fails(tmp_path: Path) -> None:
    from spark_jobs.cli import JobError, job_parser, run_main

    def body(args: object) -> dict[str, object]:
        raise JobError("no such version")

    out = tmp_path / "result.json"
    assert run_main(job_parser("spark_jobs.example", "x"), ["--result-file", str(out)],
                    body) == 2
    assert not out.exists()


@pytest.mark.slow
def test_the_task_returns_the_jobs_result_from_a_real_spark_submit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compact` on an empty lake through the venv's spark-submit on `local[1]`."""
    from dags.lambdarec_common import LambdarecSparkSubmitOperator

    monkeypatch.setenv("AIRFLOW_CONN_LAMBDAREC_OP_TEST",
                       json.dumps({"conn_type": "spark", "host": "local[1]"}))
    monkeypatch.setenv("LAMBDAREC__LAKE__ROOT", str(tmp_path / "lake"))
    monkeypatch.setenv("LAMBDAREC__MODEL__DIR", str(tmp_path / "models"))
    op = LambdarecSparkSubmitOperator(task_id="compact", job="compact",
                                      conn_id="lambdarec_op_test", application_args=[])
    result = op.execute({})
    assert result is not None
    assert (result["job"], result["bronze_rows"], result["silver_rows"]) == ("compact", 0, 0)
    assert op.application_args == []  # the per-try result file is not left in the task
    assert op.env_vars["LAMBDAREC__SPARK__MASTER"] == "local[1]"
