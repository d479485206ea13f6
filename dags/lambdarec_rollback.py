"""Manual rollback of the served lambdarec model (see the DAG's doc_md below)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from dags.lambdarec_common import (
    TAGS,
    default_task_args,
    notify_reload,
    own_client_tls,
    settings,
)

DAG_ID = "lambdarec_rollback"

DOC = """
# lambdarec rollback

Trigger manually (**Trigger DAG** in the UI, or `POST /api/v2/dags/lambdarec_rollback/dagRuns`
with `{"logical_date": null, "conf": {"version": "v20261122-..."}}`).

1. `rollback` — `lake.rollback`: points `<models dir>/CURRENT` at `version` after
   checking its bundle (manifest, checksums) and that the gate did not reject it; marks the
   version moved away from `rolled_back` in `model_runs`. Leave `version` empty to go back
   to the newest published version before the current one.
2. `notify_reload` — asks the online servers to hot-reload; an unreachable server is a
   warning, not a failure.

Versions and their status: `make sql Q="SELECT model_version, status, gate_reason FROM
model_runs ORDER BY created_at DESC"`.
"""


@task(task_id="rollback", multiple_outputs=False)
def rollback() -> dict[str, Any]:
    """Point CURRENT at the `version` param (or the previous published version)."""
    from lake import rollback as rollback_job  # run-time import (delta-rs, numpy)

    version = get_current_context()["params"].get("version") or None
    result = rollback_job.run(settings(), version=version)
    print(f"rollback: CURRENT {result.get('previous_current')} -> {result['version']}")
    return result


@task(task_id="notify_reload", multiple_outputs=False)
def notify(rollback_result: dict[str, Any]) -> dict[str, Any]:
    """Ask the online servers to hot-reload the model now named by CURRENT."""
    cfg = settings()
    return notify_reload(cfg.airflow.reload_targets or [], cfg.server.admin_token,
                         rollback_result.get("version"), fleet_dir=cfg.fleet.run_dir,
                         tls=own_client_tls(cfg.server))


@dag(
    dag_id=DAG_ID,
    description="Manual: point CURRENT at an earlier model version and reload the servers",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**default_task_args(), "retries": 1},
    tags=[*TAGS, "rollback"],
    doc_md=DOC,
    params={
        "version": Param(
            None,
            type=["null", "string"],
            description="model version to serve (empty: newest published before CURRENT)",
        ),
    },
)
def lambdarec_rollback() -> None:
    notify(rollback())  # type: ignore[arg-type]


lambdarec_rollback()
