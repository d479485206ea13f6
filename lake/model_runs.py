"""`model_runs`: one row per model version, its gate decision and where it stands.

The status of a run says what the served model (CURRENT) is to it: `current` (CURRENT names
it), `published` (accepted, served before or superseded), `rejected` (the gate refused it;
never made current without `--force`), `rolled_back` (CURRENT was moved back from it).
Publishing (`spark_jobs.publish`) and rolling back (`lake.rollback`) both move these.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from lake.tables import Lake

CURRENT = "current"
PUBLISHED = "published"
REJECTED = "rejected"
ROLLED_BACK = "rolled_back"


def model_run(lake: Lake, version: str) -> dict[str, Any] | None:
    """The `model_runs` row of `version`, or None."""
    if not lake.exists("model_runs"):
        return None
    rows = lake.read("model_runs", filters=[("model_version", "=", version)]).to_pylist()
    return rows[0] if rows else None


def model_runs(lake: Lake) -> dict[str, dict[str, Any]]:
    """Every `model_runs` row by version (empty before the first run)."""
    if not lake.exists("model_runs"):
        return {}
    return {r["model_version"]: r for r in lake.read("model_runs").to_pylist()}


def set_status(lake: Lake, versions: list[str], status: str) -> None:
    """Set `model_runs.status` of `versions` (rewrites those rows through a keyed upsert)."""
    if not versions:
        return
    rows = lake.read("model_runs").to_pylist()
    changed = [dict(r, status=status) for r in rows
               if r["model_version"] in versions and r["status"] != status]
    if changed:
        lake.upsert("model_runs", pa.Table.from_pylist(changed))
