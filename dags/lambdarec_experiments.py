"""Daily attribution and experiment analysis (see the DAG's doc_md below).

Thin DAG (STYLE.md #3): each task submits one Spark job or calls one library function for
the run's as-of date; nothing heavy happens at parse time.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

from dags.lambdarec_common import (
    TAGS,
    LambdarecSparkSubmitOperator,
    as_of_for,
    default_task_args,
    settings,
)

DAG_ID = "lambdarec_experiments"
_S = settings()
_CONN = _S.airflow.spark_conn_id
_AS_OF = "{{ ti.xcom_pull(task_ids='plan')['as_of'] }}"

DOC = f"""
# lambdarec experiments: what the recommendations earned

Batch side of the loop: the online servers record every list they show
(`bronze_impressions`) and the shop sends clicks, carts and purchases (with the list's
`recommendation_id` when it has it). Daily, after the nightly retrain:

| task | what it does | a rerun ... |
|---|---|---|
| `plan` | the **as-of** date of the run | is a pure function of the run |
| `compact` | bronze → silver, the dates changed since the last compaction | does nothing |
| `attribution` | events → `gold_attributed_events`, `gold_recommendation_metrics` | \
rewrites its days |
| `analysis` | per experiment: metrics, intervals, lift, SRM, decision | rewrites its \
as-of partitions of `experiment_results` |
| `report` | `<models dir>/reports/experiments/<as_of>/report.md`, a plot over time | \
rewrites it |

**Attribution** (`spark_jobs.attribution`): an event's explicit `recommendation_id` wins
when it names a list of the same user holding the item; otherwise the last list that
showed the item to the user within `attribution.window_hours`
({_S.attribution.window_hours:g} h). A day's metrics settle once the window has passed:
each run rewrites as-of D and the {max(1, math.ceil(_S.attribution.window_hours / 24))}
day(s) before.

**Decision** (`spark_jobs.experiment_analysis`): fixed horizon: `collecting` until every
arm has `experiments.min_users_per_arm` ({_S.experiments.min_users_per_arm}) users; the
first analysis past it decides on `experiments.decision_metric`
(`{_S.experiments.decision_metric}`) at alpha {_S.experiments.alpha:g}, and later runs keep
that decision. An SRM p-value below {_S.experiments.srm_alpha:g} makes it `invalid`.
Promote the winner with `python -m lake.experiments promote EXP ARM`.

**Dates.** Scheduled daily at 02:00 UTC with data intervals: the run for logical date D
works as of D. A manual trigger without a logical date works as of yesterday (or the
last event date when the data ends earlier), like the retrain DAG; the `as_of` param
overrides both.
"""


@task(task_id="plan", multiple_outputs=False)
def plan() -> dict[str, Any]:
    """The **as-of** date of this run (the last day of data attributed and analysed)."""
    from lake.as_of import event_date_bounds  # delta-rs: run time
    from lake.tables import Lake

    ctx = get_current_context()
    dag_run = ctx["dag_run"]
    as_of = as_of_for(dag_run.logical_date, dag_run.run_after, ctx["params"].get("as_of"),
                      event_date_bounds(Lake.from_settings(settings().lake)))
    print(f"plan: as of {as_of}")
    return {"as_of": as_of.isoformat()}


@task(task_id="analysis", multiple_outputs=False)
def analysis(plan_result: dict[str, Any]) -> dict[str, Any]:
    """Analyse every experiment that ran on the as-of day into `experiment_results`."""
    from datetime import date

    from spark_jobs import experiment_analysis  # tea-tasting, pyarrow: run time

    result = experiment_analysis.run(settings(), as_of=date.fromisoformat(plan_result["as_of"]))
    for exp_id, r in result["experiments"].items():
        print(f"experiment {exp_id}: {r['status']}, SRM p {r['srm_pvalue']}, users "
              f"{r['users']}, decisions {r['decisions']}")
    return result


@task(task_id="report", multiple_outputs=False)
def report(plan_result: dict[str, Any]) -> dict[str, Any]:
    """Write the experiments report of the as-of date (tables + a plot over time)."""
    from datetime import date

    from spark_jobs import experiment_report  # matplotlib, delta-rs: run time

    result = experiment_report.write_report(settings(), date.fromisoformat(plan_result["as_of"]))
    print(f"experiments report: {result['report']}")
    return result


@dag(
    dag_id=DAG_ID,
    description="Daily: compact → attribute events to lists → analyse experiments → report",
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    dagrun_timeout=timedelta(hours=4),
    tags=[*TAGS, "experiments"],
    doc_md=DOC,
    params={
        "as_of": Param(None, type=["null", "string"], format="date",
                       description="override the as-of date (YYYY-MM-DD)"),
    },
)
def lambdarec_experiments() -> None:
    planned = plan()
    compact = LambdarecSparkSubmitOperator(
        task_id="compact",
        job="compact",
        conn_id=_CONN,
        application_args=[],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        doc_md="Spark: bronze → silver for the event dates changed since the last "
               "compaction (nothing when the retrain DAG compacted already).",
    )
    attribution = LambdarecSparkSubmitOperator(
        task_id="attribution",
        job="attribution",
        conn_id=_CONN,
        application_args=["--as-of", _AS_OF],
        driver_memory=_S.spark.driver_memory,
        executor_memory=_S.spark.executor_memory,
        doc_md="Spark (or Arrow when small): clicks, carts, purchases → "
               "`gold_attributed_events` and the daily `gold_recommendation_metrics` of the "
               "as-of day and the days its window settles.",
    )
    analysed = analysis(planned)  # type: ignore[arg-type]
    reported = report(planned)  # type: ignore[arg-type]
    planned >> compact >> attribution >> analysed >> reported


lambdarec_experiments()
