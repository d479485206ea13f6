"""Shared pieces of the lambdarec DAGs (not a DAG file; listed in `.airflowignore`).

Everything here is cheap to import: the Airflow SDK, the Spark provider's operator and
`lake.config` (YAML + pydantic). Spark, implicit, FAISS, numpy and the lake are imported
inside task callables only, so parsing a DAG file never starts a JVM, opens the lake or
touches the network (STYLE.md #3).

* `plan_run` turns a DAG run into the dates and the model version its tasks work on. The
  version is a pure function of the run, so clearing and rerunning any task of a run
  rewrites that run's own version and never creates a second one.
* `LambdarecSparkSubmitOperator` submits `spark_jobs/<job>.py` with `spark-submit` to the
  master of the Airflow connection `settings.airflow.spark_conn_id`, with this
  interpreter on both driver and executors and the project on `PYTHONPATH`; the job's
  JSON result (which it also writes to the file named by `--result-file`) becomes the
  task's XCom return value. It changes only what the provider's operator lets a caller
  set (its arguments and `execute`), nothing private of the operator or its hook.
* `notify_reload` asks each online server to hot-reload the model; an unreachable server
  is a warning, never a task failure (it also polls CURRENT / reloads on restart).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from lake.config import PROJECT_ROOT, Settings, load_settings
from lake.reload_notice import notify_reload  # noqa: F401 - the DAGs' reload step
from lake.tls import own_client_tls  # noqa: F401 - reaching TLS servers

log = logging.getLogger(__name__)

SPARK_JOBS_DIR = PROJECT_ROOT / "spark_jobs"
TAGS = ["lambdarec", "batch"]
RESULT_FILE_FLAG = "--result-file"
"""The jobs' option (`spark_jobs.cli.job_parser`) naming a file for their JSON result."""


def settings() -> Settings:
    """The project settings (infra/lambdarec.yaml + LAMBDAREC__* environment)."""
    return load_settings()


def default_task_args() -> dict[str, Any]:
    """Retries and timeouts shared by every lambdarec task."""
    return {
        "owner": "lambdarec",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=3),
    }


# --------------------------------------------------------------------------- run plan


def model_version_for(dag_id: str, run_id: str, as_of: date) -> str:
    """Deterministic model version of one DAG run, e.g. `v20261122-3fa91c0d`
    (`lake.bundle.new_version`, as `make pipeline` names its runs).

    The suffix distinguishes two runs for the same date (a scheduled run and a manual one)
    but is identical for every retry of the same run.
    """
    from lake.bundle import new_version

    return new_version(as_of, f"{dag_id}\x00{run_id}")


def as_of_for(
    logical_date: datetime | None, run_after: datetime | None, override: str | None = None,
    event_bounds: tuple[date, date] | None = None,
) -> date:
    """The as-of date a run works on.

    * `override` (the `as_of` trigger param, `YYYY-MM-DD`) wins when given.
    * Scheduled runs use a daily data interval: the logical date is the start of the day
      being processed, so as-of = the logical date (the run starts after that day ends).
    * Manual runs without a logical date (Airflow 3 REST / UI default) follow `make
      pipeline`'s rule, `lake.as_of.default_as_of`: the last complete UTC day before the
      run, or the last event date when the data (`event_bounds`) ends earlier.
    """
    from lake.as_of import default_as_of

    if override:
        try:
            return date.fromisoformat(str(override)[:10])
        except ValueError:
            raise ValueError(f"param as_of={override!r} is not a YYYY-MM-DD date") from None
    if logical_date is not None:
        return logical_date.date()
    if run_after is None:
        raise ValueError("the DAG run has neither a logical date nor run_after")
    return default_as_of(run_after, event_bounds)


def plan_run(
    *,
    dag_id: str,
    run_id: str,
    logical_date: datetime | None,
    run_after: datetime | None,
    params: Mapping[str, Any],
    models_dir: Path,
    event_bounds: tuple[date, date] | None = None,
) -> dict[str, Any]:
    """As-of date and version for one run of `lambdarec_retrain` (pure; unit-tested).

    Compaction needs no dates: it rewrites the event dates bronze commits changed since
    the last compaction (`spark_jobs.compact`), late events included."""
    as_of = as_of_for(logical_date, run_after, params.get("as_of"), event_bounds)
    version = model_version_for(dag_id, run_id, as_of)
    return {
        "as_of": as_of.isoformat(),
        "version": version,
        "report": str(report_path(models_dir, version)),
    }


def report_path(models_dir: Path, version: str) -> Path:
    """Where `spark_jobs.evaluate` writes the report of `version`."""
    return Path(models_dir) / "reports" / version / "report.md"


# --------------------------------------------------------------------------- spark-submit


def venv_bin() -> Path:
    """The bin directory of the interpreter running this task (the project venv)."""
    return Path(sys.executable).parent


def spark_submit_binary() -> str:
    """`spark-submit` of this venv's pyspark when present, else the one on PATH."""
    candidate = venv_bin() / "spark-submit"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("spark-submit")
    if found is None:
        raise FileNotFoundError(
            f"spark-submit is neither in {venv_bin()} nor on PATH; install pyspark in the venv"
        )
    return found


def _prepend_path(var: str, entry: str, env: Mapping[str, str]) -> str:
    parts = [p for p in env.get(var, "").split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *parts])


def spark_job_env(master: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment added to the spark-submit process (and so to the Python driver).

    The job builds its session with `lake.spark_session.get_spark`, which sets the master
    from settings: `LAMBDAREC__SPARK__MASTER` makes that the connection's master, so the
    Airflow connection stays the single switch between `local[*]` and a cluster.
    """
    env = os.environ if env is None else env
    return {
        "PYTHONPATH": _prepend_path("PYTHONPATH", str(PROJECT_ROOT), env),
        "PATH": _prepend_path("PATH", str(venv_bin()), env),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "LAMBDAREC__SPARK__MASTER": master,
    }


def spark_job_conf() -> dict[str, str]:
    """`--conf` entries: same interpreter and project path on driver and executors."""
    return {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(PROJECT_ROOT),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
    }


def connection_master(conn_id: str) -> str:
    """The Spark master `spark-submit` is given for Airflow connection `conn_id`.

    Read as the Spark provider defines its connection: `host` is the master (`local[*]`,
    `yarn`, `spark://h`) or a bare host name the connection type goes in front of
    (`spark://h`), and `port`, when set, follows it. A connection that does not exist
    means `yarn`, the provider's own fallback, so the job and spark-submit agree.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.warning("Airflow connection %s not found: spark-submit defaults to yarn", conn_id)
        return "yarn"
    host = conn.host or ""
    master = host if conn.conn_type == "spark" and host and ("://" in host or not conn.port) \
        else f"{conn.conn_type}://{host}"
    return f"{master}:{conn.port}" if conn.port else master


def read_result(path: Path) -> dict[str, Any] | None:
    """The JSON object a job wrote to its `--result-file`, or None when it wrote none."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class LambdarecSparkSubmitOperator(SparkSubmitOperator):
    """`spark-submit spark_jobs/<job>.py <args>` against the configured Spark connection.

    Resolved when the task runs (never at parse time): the connection's master (exported
    to the job as `LAMBDAREC__SPARK__MASTER`), the venv's Python and `spark-submit` (first
    on the `PATH` spark-submit is started with), `PYTHONPATH`. Returns the job's JSON
    result, which Airflow stores as XCom: the job writes it to a file of this task's
    (`--result-file`) as well as printing it, so it does not depend on how the provider
    logs spark-submit's output. The driver must run here (client deploy mode, as
    `local[*]` and the standalone cluster do) for the file and the environment to reach it.
    """

    ui_color = "#ffd9b3"

    def __init__(self, *, job: str, conn_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"lambdarec-{job}")
        # a bare name wins over the connection's `spark-binary` extra and is looked up on
        # `spark_job_env`'s PATH when the task runs: the venv's bin comes first there
        kwargs.setdefault("spark_binary", "spark-submit")
        super().__init__(
            application=str(SPARK_JOBS_DIR / f"{job}.py"), conn_id=conn_id, **kwargs
        )
        self.job = job
        self.spark_conn_id = conn_id

    def execute(self, context: Any) -> dict[str, Any] | None:  # type: ignore[override]
        binary = spark_submit_binary()  # none at all: one clear line, nothing submitted
        master = connection_master(self.spark_conn_id)
        self.conf = {**spark_job_conf(), **(self.conf or {})}
        self.env_vars = {**spark_job_env(master), **(self.env_vars or {})}
        args = list(self.application_args or [])
        self.log.info("Submitting spark_jobs/%s.py with %s to %s", self.job, binary, master)
        with tempfile.TemporaryDirectory(prefix=f"lambdarec-{self.job}-") as tmp:
            result_file = Path(tmp) / "result.json"
            self.application_args = [*args, RESULT_FILE_FLAG, str(result_file)]
            try:
                super().execute(context)
            finally:
                self.application_args = args
            result = read_result(result_file)
        if result is None:
            self.log.warning("spark_jobs/%s.py wrote no JSON result", self.job)
        else:
            self.log.info("Result: %s", json.dumps(result, sort_keys=True))
        return result


class EvaluateSparkSubmitOperator(LambdarecSparkSubmitOperator):
    """The evaluate job, plus a link to its report: logged and pushed as XCom `report`."""

    def execute(self, context: Any) -> dict[str, Any] | None:  # type: ignore[override]
        result = super().execute(context)
        report = (result or {}).get("report")
        if not report:
            planned = context["ti"].xcom_pull(task_ids="plan") or {}
            report = planned.get("report")
        if report:
            state = "written" if Path(report).exists() else "MISSING"
            self.log.info("Evaluation report (%s): %s", state, report)
            context["ti"].xcom_push(key="report", value=str(report))
        return result
