"""Daily compliance step: make recorded erasures physical (see the DAG's doc_md below)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag, task

from dags.lambdarec_common import TAGS, default_task_args, settings

DAG_ID = "lambdarec_erasure"

DOC = """
# lambdarec erasure

Runs daily at 03:00 UTC (and on demand with **Trigger DAG**). `ForgetUser` deletes a user's
rows at once, but Delta keeps the old files for time travel and model bundles keep the
user's id, factors and history. This DAG's one task, `purge_erasures`, calls
`lake.erasure.purge` (also `python -m lake.erasure`):

1. deletes again erased users' rows that arrived before their erasure (bronze, silver);
2. deletes the data files the Delta log marks as removed in every table holding user ids,
   checkpoints, and drops the log before the checkpoint (earlier versions are gone);
3. rewrites bundles trained before an erasure without the user and deletes staged models
   holding one.

Maximum delay from `ForgetUser` to no trace on disk: 24 hours plus the purge's run time.
Only the `user_erasures` record (user id, request time) remains.
"""


@task(task_id="purge_erasures", multiple_outputs=False)
def purge_erasures() -> dict[str, Any]:
    """Make every recorded erasure physical in the lake, bundles and staged models."""
    from lake import erasure  # run-time import (deltalake, numpy)

    result = erasure.purge(settings())
    print(f"erasure purge: {result}")
    return result


@dag(
    dag_id=DAG_ID,
    description="Daily: delete erased users' history from table versions, bundles, staging",
    schedule="0 3 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    tags=[*TAGS, "erasure"],
    doc_md=DOC,
)
def lambdarec_erasure() -> None:
    purge_erasures()


lambdarec_erasure()
