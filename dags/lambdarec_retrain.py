"""Nightly retraining of the lambdarec ALS model (see the DAG's doc_md below).

Thin DAG (STYLE.md #3): each task submits one Spark job or calls one library function for
the run's as-of date; nothing heavy happens at parse time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from dags.lambdarec_common import (
    TAGS,
    EvaluateSparkSubmitOperator,
    LambdarecSparkSubmitOperator,
    default_task_args,
    notify_reload,
    own_client_tls,
    plan_run,
    settings,
)

DAG_ID = "lambdarec_retrain"
_S = settings()
_CONN = _S.airflow.spark_conn_id
_PLAN = "{{ ti.xcom_pull(task_ids='plan')['%s'] }}"

DOC = f"""
# lambdarec nightly retrain

Batch layer of the Lambda architecture: rebuilds the ALS model from the Delta lake and,
if it passes the gate, makes it the model the online servers serve.

| task | what it does | a rerun ... |
|---|---|---|
| `plan` | as-of date, **model version** | is a pure function of the run |
| `coalesce_bronze` | delta-rs `optimize.compact` of bronze's small files | merges nothing |
| `compact` | bronze → silver, the dates changed since the last run | does nothing |
| `tune` | recipe search on a validation split, `tune_budget_s` | rewrites its tuning.json |
| `interactions` | silver → gold `as_of`, tuned strength | rewrites that partition |
| `train` | Spark: ALS (`backend` implicit/mllib/ials) → staged `version` (*) | overwrites it |
| `evaluate` | per-user holdout vs popularity, EASE/item-kNN + report (*) | overwrites the report |
| `publish` | gate, bundle, `model_runs`, CURRENT (***); rejected: fails, says why | keeps it (**) |
| `notify_reload` | `ReloadModel` on {', '.join(_S.airflow.reload_targets or [])} | is idempotent |

(*) At scale `train` leaves the evaluated users' held-out pairs out of the fit and
`evaluate` scores the staged item factors; otherwise it refits (`spark_jobs.eval_sample`).

(**) After `train` ran again, `publish` republishes the version from the new model when it
was never served (rejected), and fails when it was: a served version is never replaced.

(***) With param `into_experiment` (config `publish.into_experiment`) an accepted model
does not go live: it becomes the `challenger` arm of that experiment against the champion
(`publish.challenger_share` of its users), servers pick it up from the experiments file,
and `notify_reload` is skipped. Promote it with
`python -m lake.experiments promote EXP challenger`.

Late events land in the bronze partition of their event date; the next compaction sees
that bronze commit and rewrites that date, however old (silver records the bronze version
it has read).

**Dates.** Scheduled daily with data intervals: the run for logical date D starts after D
ends and processes as-of D. A manual trigger without a logical date processes yesterday
(UTC), or the last event date when the data ends earlier: the same rule as `make pipeline`
(`lake.as_of`). The `as_of` param overrides both.

**Version.** `v<as_of>-<hash of the run id>`: a cleared or retried task writes the same
version again; a second run for the same date gets its own version.

**Evaluation report.** Task `evaluate` logs the path and pushes it as XCom `report`
(`<models dir>/reports/<version>/report.md`, currently under `{_S.model.dir}`).
`publish` returns `accepted` / `reason` in its XCom. A model the gate **rejects fails
`publish`** (no retry) with the reason as its error, so the run is red in the grid and the
reason is one click away (the task's log, XCom `gate`, and the report's gate section);
CURRENT is unchanged and `notify_reload` does not run (`upstream_failed`).

**Spark.** Jobs are submitted with `spark-submit` to the master of Airflow connection
`{_CONN}` (default `local[*]`; point it at `spark://127.0.0.1:7077` for the standalone
cluster). `compact` and `interactions` run on Spark, or in the task's own process on Arrow
when the master is local and the input is small (`spark.engine`, default `auto`: up to
`spark.arrow_max_rows` rows); each logs which.
"""


@task(task_id="plan", multiple_outputs=False)
def plan() -> dict[str, Any]:
    """Compute **as_of**, the compaction window and the **model version** of this run.

    The version depends only on the DAG run (its id and as-of date), never on the
    attempt, so rerunning any task overwrites this run's own artefacts.
    """
    from lake.as_of import event_date_bounds  # delta-rs: run time
    from lake.tables import Lake

    ctx = get_current_context()
    dag_run = ctx["dag_run"]
    cfg = settings()
    result = plan_run(
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        logical_date=dag_run.logical_date,
        run_after=dag_run.run_after,
        params=ctx["params"],
        models_dir=cfg.model.dir,
        event_bounds=event_date_bounds(Lake.from_settings(cfg.lake)),
    )
    print(f"plan: {result}")
    return result


@task(task_id="coalesce_bronze", multiple_outputs=False)
def coalesce_bronze() -> dict[str, Any]:
    """Merge bronze's small files (one per micro-batch flush) into large ones per date.

    Rows are unchanged and the commit says so (`dataChange: false`), so compaction does
    not treat the merged dates as changed; Spark then reads a few files per date.
    """
    from lake.tables import Lake  # delta-rs: run time

    metrics = Lake.from_settings(settings().lake).coalesce_small_files("bronze_events")
    out = {k: metrics.get(k) for k in ("numFilesAdded", "numFilesRemoved", "totalConsideredFiles")}
    print(f"coalesce bronze_events: {out}")
    return out


@task(task_id="tune", multiple_outputs=False)
def tune(plan_result: dict[str, Any]) -> dict[str, Any]:
    """Search the model recipe (strength, ALS, blend) for this version within the budget.

    Params: `tune` (off: skipped, and the run's ALS params are used as given) and
    `tune_budget_s`. The run's ALS params are the search's first trial.
    """
    from datetime import date

    from spark_jobs import tune as tune_job  # heavy (numpy, implicit, delta): run time

    params = get_current_context()["params"]
    if not params["tune"]:
        raise AirflowSkipException("tuning is off for this run (param tune=false)")
    cfg = settings()
    train = cfg.train.model_copy(update={
        k: params[k] for k in ("backend", "factors", "regularization", "iterations", "alpha")})
    budget = cfg.tune.model_copy(update={"budget_s": float(params["tune_budget_s"])})
    cfg = cfg.model_copy(update={"train": train, "tune": budget})
    result = tune_job.run(cfg, as_of=date.fromisoformat(plan_result["as_of"]),
                          version=plan_result["version"])
    print(f"tune {result['version']}: {result['trials']} trials, best {result['metric']} "
          f"{result['best_metric']:.4f}: {result['best']}")
    return result


@task(task_id="publish", multiple_outputs=False)
def publish(plan_result: dict[str, Any]) -> dict[str, Any]:
    """Gate the evaluated model and publish it (bundle, factor tables, CURRENT).

    Params: `gate_margin` (min relative lift of the gate metric over popularity) and
    `force_publish`. A rejection is recorded (`model_runs` status `rejected`, the report's
    gate section) and then **fails this task** without retries, naming the reason: the run
    is red in the grid, `notify_reload` does not run, XCom `gate` holds the decision.
    """
    from spark_jobs import publish as publish_job  # heavy (numpy, faiss, delta): run time

    params = get_current_context()["params"]
    cfg = settings()
    gate = cfg.gate.model_copy(update={"min_lift_over_popularity": float(params["gate_margin"])})
    cfg = cfg.model_copy(update={"gate": gate})
    publish_cfg = cfg.publish.model_copy(update={
        "challenger_share": float(params["challenger_share"])})
    cfg = cfg.model_copy(update={"publish": publish_cfg})
    result = publish_job.run(cfg, version=plan_result["version"],
                             force=bool(params["force_publish"]),
                             into_experiment=params["into_experiment"] or None)
    verdict = "ACCEPTED" if result["accepted"] else "REJECTED"
    print(f"publish {result['version']}: {verdict} ({result['reason']}); "
          f"current={result.get('current')}")
    result["report"] = plan_result["report"]
    if not result["accepted"]:
        # Red in the grid, the reason in the failure message (one click away) and in XCom
        # `gate`; no retry: the same evaluation gives the same decision.
        get_current_context()["ti"].xcom_push(key="gate", value=result)
        raise AirflowFailException(
            f"model {result['version']} rejected by the gate, CURRENT stays "
            f"{result.get('current')}: {result['reason']} (report: {result['report']})")
    return result


@task(task_id="notify_reload", multiple_outputs=False)
def notify(publish_result: dict[str, Any]) -> dict[str, Any]:
    """Ask the online servers (`airflow.reload_targets`) to hot-reload the new model.

    Skipped when the gate rejected the model. An unreachable server is logged as a
    warning (servers also pick CURRENT up on restart / polling), never a failure.
    """
    if not publish_result.get("accepted"):
        raise AirflowSkipException(
            f"model {publish_result.get('version')} not published: {publish_result.get('reason')}"
        )
    experiment = publish_result.get("experiment")
    if experiment:  # a reload would make the challenger everybody's model
        raise AirflowSkipException(
            f"model {publish_result.get('version')} is the challenger of experiment "
            f"{experiment['experiment_id']}; servers follow the experiments file")
    cfg = settings()
    return notify_reload(cfg.airflow.reload_targets or [], cfg.server.admin_token,
                         publish_result.get("version"), fleet_dir=cfg.fleet.run_dir,
                         tls=own_client_tls(cfg.server))


@dag(
    dag_id=DAG_ID,
    description="Nightly: compact → tune → interactions → train ALS → evaluate → gated publish "
                "→ reload",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    dagrun_timeout=timedelta(hours=8),
    tags=TAGS,
    doc_md=DOC,
    params={
        "backend": Param(_S.train.backend, enum=["implicit", "mllib", "ials"],
                         description="ALS trainer: implicit (fast, CPU/GPU), Spark MLlib, "
                                     "or ials (numba, frequency-scaled lambda n ** nu)"),
        "factors": Param(_S.train.factors, type="integer", minimum=1, maximum=1024,
                         description="latent dimension"),
        "regularization": Param(_S.train.regularization, type=["null", "number"], minimum=0,
                                description="lambda; empty = the backend's default "
                                            "(implicit 100 unscaled, MLlib/ials 0.1 x "
                                            "interactions)"),
        "iterations": Param(_S.train.iterations, type="integer", minimum=1, maximum=200),
        "alpha": Param(_S.train.alpha, type="number", exclusiveMinimum=0,
                       description="confidence scaling of implicit feedback"),
        "tune": Param(_S.tune.enabled, type="boolean",
                      description="search strength / ALS / blend settings before training "
                                  "(the params above are its first trial)"),
        "tune_budget_s": Param(_S.tune.budget_s, type="number", exclusiveMinimum=0,
                               description="CPU-seconds budget of the search"),
        "gate_margin": Param(_S.gate.min_lift_over_popularity, type="number", minimum=-1,
                             description="required relative lift of "
                                         f"{_S.gate.metric} over popularity"),
        "force_publish": Param(False, type="boolean",
                               description="publish even if the gate rejects the model"),
        "into_experiment": Param(_S.publish.into_experiment, type=["null", "string"],
                                 description="experiment name: an accepted model becomes its "
                                             "challenger against the champion instead of "
                                             "going live (promote: python -m "
                                             "lake.experiments promote EXP challenger)"),
        "challenger_share": Param(_S.publish.challenger_share, type="number",
                                  exclusiveMinimum=0, exclusiveMaximum=1,
                                  description="share of the experiment's users the "
                                              "challenger serves"),
        "as_of": Param(None, type=["null", "string"], format="date",
                       description="override the as-of date (YYYY-MM-DD)"),
    },
)
def lambdarec_retrain() -> None:
    planned = plan()

    compact = LambdarecSparkSubmitOperator(
        task_id="compact",
        job="compact",
        conn_id=_CONN,
        application_args=[],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        doc_md="Spark: bronze → silver for the event dates bronze commits changed since the "
               "last compaction (incremental; rewrites exactly those silver partitions).",
    )
    interactions = LambdarecSparkSubmitOperator(
        task_id="interactions",
        job="interactions",
        conn_id=_CONN,
        application_args=["--as-of", _PLAN % "as_of", "--version", _PLAN % "version"],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        trigger_rule="none_failed",  # runs after a skipped `tune` too
        doc_md="Spark: silver → gold interactions, partition `as_of` (rewritten on rerun), "
               "with the strength settings `tune` chose for the version.",
    )
    train = LambdarecSparkSubmitOperator(
        task_id="train",
        job="train",
        conn_id=_CONN,
        application_args=[
            "--as-of", _PLAN % "as_of",
            "--version", _PLAN % "version",
            "--backend", "{{ params.backend }}",
            "--factors", "{{ params.factors }}",
            "--regularization",
            "{{ 'auto' if params.regularization is none else params.regularization }}",
            "--iterations", "{{ params.iterations }}",
            "--alpha", "{{ params.alpha }}",
        ],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        doc_md="Spark: ALS on gold `as_of` with the tuned recipe (or the run's params when "
               "`tune` is off) → staged model `version`.",
    )
    evaluate = EvaluateSparkSubmitOperator(
        task_id="evaluate",
        job="evaluate",
        conn_id=_CONN,
        application_args=["--as-of", _PLAN % "as_of", "--version", _PLAN % "version",
                          "--gate-margin", "{{ params.gate_margin }}"],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        doc_md="Per-user holdout metrics (with bootstrap intervals) of the staged model's "
               "recipe vs popularity and EASE / item-kNN. **Report:** XCom `report` of this "
               "task, i.e. `<models dir>/reports/<version>/report.md` (path also in the log).",
    )
    published = publish(planned)  # type: ignore[arg-type]
    tuned = tune(planned)  # type: ignore[arg-type]
    planned >> coalesce_bronze() >> compact >> tuned >> interactions >> train >> evaluate
    evaluate >> published
    notify(published)  # type: ignore[arg-type]


lambdarec_retrain()
