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
  JSON result line becomes the task's XCom return value.
* `notify_reload` asks each online server to hot-reload the model; an unreachable server
  is a warning, never a task failure (it also polls CURRENT / reloads on restart).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from lake.config import PROJECT_ROOT, Settings, load_settings
from online.notify import notify_reload  # noqa: F401 - the DAGs' reload step
from online.tls import own_client_tls  # noqa: F401 - reaching TLS servers

log = logging.getLogger(__name__)

SPARK_JOBS_DIR = PROJECT_ROOT / "spark_jobs"
TAGS = ["lambdarec", "batch"]


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


def last_json_object(lines: Sequence[str] | Iterator[str]) -> dict[str, Any] | None:
    """The last line that is a JSON object (the jobs print their result that way)."""
    result = None
    for raw in lines:
        line = raw.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                result = obj
    return result


class LambdarecSparkSubmitOperator(SparkSubmitOperator):
    """`spark-submit spark_jobs/<job>.py <args>` against the configured Spark connection.

    Resolved when the task runs (never at parse time): the venv's `spark-submit` and
    Python, the connection's master (exported to the job as `LAMBDAREC__SPARK__MASTER`),
    `PYTHONPATH`. Returns the job's JSON result line, which Airflow stores as XCom.
    """

    ui_color = "#ffd9b3"

    def __init__(self, *, job: str, conn_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"lambdarec-{job}")
        super().__init__(
            application=str(SPARK_JOBS_DIR / f"{job}.py"), conn_id=conn_id, **kwargs
        )
        self.job = job
        self.job_result: dict[str, Any] | None = None

    def _get_hook(self):  # type: ignore[no-untyped-def]
        hook = super()._get_hook()
        process = hook._process_spark_submit_log
        operator = self

        def capture(itr: Iterator[str]) -> None:
            def tee() -> Iterator[str]:
                for line in itr:
                    found = last_json_object([line])
                    if found is not None:
                        operator.job_result = found
                    yield line

            process(tee())

        hook._process_spark_submit_log = capture  # type: ignore[method-assign]
        return hook

    def execute(self, context: Any) -> dict[str, Any] | None:  # type: ignore[override]
        if self._spark_binary is None:
            self._spark_binary = spark_submit_binary()
        self.conf = {**spark_job_conf(), **(self.conf or {})}
        # Resolve the connection once to learn the master, then let the operator build
        # the hook that actually submits, with the environment that names that master.
        master = super()._get_hook()._connection["master"]
        self.env_vars = {**spark_job_env(master), **(self.env_vars or {})}
        self._hook = None
        self.log.info("Submitting spark_jobs/%s.py to %s", self.job, master)
        super().execute(context)
        if self.job_result is None:
            self.log.warning("spark_jobs/%s.py printed no JSON result line", self.job)
        else:
            self.log.info("Result: %s", json.dumps(self.job_result, sort_keys=True))
        return self.job_result


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
