"""Erasure made physical: after `purge()`, no table version, model bundle or staged model on
disk holds a trace of an erased user beyond their `user_erasures` record.

`ForgetUser` deletes the user's rows at once, but a Delta delete is logical: the files
holding the rows stay for time travel, and the transaction log keeps their statistics. A
model bundle and the staged model of a run keep the user's id, factors and history. The
compliance step (`python -m lake.erasure`, the nightly `lambdarec_erasure` DAG; at most
24 h after the ForgetUser call plus the purge's own run time) therefore:

1. deletes again the erased users' rows that arrived before their erasure from bronze and
   silver (a compaction that read bronze before the delete may have written them later)
   and the impressions shown to them before it (a replica without the fleet channel may
   have flushed some after the delete);
2. for every table that holds user ids: deletes the data files the log marks as removed,
   writes a checkpoint and drops every log entry before it (so no earlier version, and no
   file statistics naming the user, can be read any more);
3. rewrites every bundle trained before an erasure without the user (ids, factors,
   history; checksums renewed) and deletes staged models that hold an erased user (older
   than an hour: a younger one may belong to a running pipeline; the next purge gets it).

Before all that (erasures or not) it repairs the lake (`lake.repair`): files a delete or
merge stored in other types than declared are rewritten, so the history purge then drops
the mistyped originals too.

Files a writer has not committed yet are never touched (only files the log removed), so
the purge may run while servers ingest.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from lake.bundle import (
    STAGING,
    drop_users,
    list_versions,
    read_manifest,
    staged_mtime,
    staged_user_ids,
)
from lake.config import Settings, load_settings
from lake.delta_log import commit_actions
from lake.repair import repair
from lake.schemas import (
    BRONZE_EVENTS,
    BRONZE_IMPRESSIONS,
    GOLD_ATTRIBUTED_EVENTS,
    GOLD_INTERACTIONS,
    SILVER_EVENTS,
    USER_ERASURES,
    USER_FACTORS,
)
from lake.tables import Lake, sql_literal
from lake.training_cut import trained_from

log = logging.getLogger(__name__)

USER_TABLES: tuple[str, ...] = (
    BRONZE_EVENTS.name, SILVER_EVENTS.name, GOLD_INTERACTIONS.name, USER_FACTORS.name,
    GOLD_ATTRIBUTED_EVENTS.name, BRONZE_IMPRESSIONS.name,
)
"""Every table holding user ids (besides the erasure records themselves)."""
ARRIVAL_TABLES: tuple[str, ...] = (BRONZE_EVENTS.name, SILVER_EVENTS.name,
                                   BRONZE_IMPRESSIONS.name)
ARRIVAL_COLUMN = {BRONZE_IMPRESSIONS.name: "ts"}
"""When a row arrived, where it is not `received_at` (an impression: when it was shown)."""
STAGING_MIN_AGE_S = 3600.0
DEFAULT_LOG_RETENTION = "interval 30 days"


def erasures(lake: Lake) -> dict[str, datetime]:
    """user_id -> their latest erasure request."""
    if not lake.exists(USER_ERASURES.name):
        return {}
    out: dict[str, datetime] = {}
    for row in lake.read(USER_ERASURES.name, columns=["user_id", "requested_at"]).to_pylist():
        at = row["requested_at"]
        if row["user_id"] not in out or at > out[row["user_id"]]:
            out[row["user_id"]] = at
    return out


def erased_users(lake: Lake, since: datetime | None = None) -> set[str]:
    """Users erased at or after `since` (all when None): a model trained on data up to
    `since` may still hold their vectors, so servers must not serve them."""
    if not lake.exists(USER_ERASURES.name):
        return set()
    table = lake.read(USER_ERASURES.name, columns=["user_id", "requested_at"])
    if since is not None:
        requested = table["requested_at"]
        table = table.filter(pc.greater_equal(requested, pa.scalar(since, requested.type)))
    return set(table["user_id"].to_pylist())


# -- tables ------------------------------------------------------------------------------
def _redelete_arrivals(lake: Lake, erased: dict[str, datetime]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ARRIVAL_TABLES:
        n = 0
        for user, at in erased.items():
            pred = (f"user_id = {sql_literal(user)} AND "
                    f"{ARRIVAL_COLUMN.get(name, 'received_at')} <= "
                    f"'{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'")
            n += int(lake.delete(name, pred).get("num_deleted_rows", 0) or 0)
        out[name] = n
    return out


def purge_table_history(path: Path) -> int:
    """Delete the data files the log marks as removed, checkpoint, and drop the log before
    the checkpoint: only the current version stays readable. Returns files deleted."""
    if not DeltaTable.is_deltatable(str(path)):
        return 0
    dt = DeltaTable(str(path))
    root = str(path.resolve())
    live = {unquote(u.removeprefix("file://").removeprefix(root + "/")) for u in dt.file_uris()}
    removed: set[str] = set()
    for commit in sorted((path / "_delta_log").glob("*.json")):
        for action in commit_actions(commit.read_text()):
            if "remove" in action:
                removed.add(unquote(action["remove"]["path"]))
    deleted = 0
    for rel in sorted(removed - live):
        f = path / rel
        if f.exists():
            f.unlink()
            deleted += 1
    # Log retention 0 only while the old entries are dropped: other time travel is kept.
    retention = dt.metadata().configuration.get("delta.logRetentionDuration",
                                                 DEFAULT_LOG_RETENTION)
    dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
    dt = DeltaTable(str(path))
    dt.create_checkpoint()
    dt.cleanup_metadata()
    dt.alter.set_table_properties({"delta.logRetentionDuration": retention})
    DeltaTable(str(path)).create_checkpoint()  # the properties commit: nothing before it
    return deleted


# -- bundles and staged models -----------------------------------------------------------
def scrub_bundles(models_dir: Path, erased: dict[str, datetime]) -> dict[str, int]:
    """Remove users from every bundle trained before their erasure (`lake.bundle.drop_users`:
    ids, factors, history, user gram, checksums; in place, the manifest last)."""
    out: dict[str, int] = {}
    for version in list_versions(models_dir):
        path = models_dir / version
        since = trained_from(read_manifest(path))
        users = {u for u, at in erased.items() if since is None or at >= since}
        if users:
            n = drop_users(path, users)
            if n:
                out[version] = n
    return out


def scrub_staging(models_dir: Path, erased: dict[str, datetime]) -> list[str]:
    """Delete staged runs (models older than an hour) whose model holds an erased user."""
    staging = models_dir / STAGING
    removed: list[str] = []
    if not staging.is_dir():
        return removed
    wanted = np.array(sorted(erased), dtype=str)
    for run in sorted(p for p in staging.iterdir() if p.is_dir()):
        written = staged_mtime(run)
        if written is None or time.time() - written < STAGING_MIN_AGE_S:
            continue
        ids = staged_user_ids(run)
        holds = ids is not None and bool(np.isin(ids, wanted).any())
        if holds:
            shutil.rmtree(run)
            removed.append(run.name)
    return removed


# -- the compliance step -----------------------------------------------------------------
def purge(settings: Settings) -> dict[str, Any]:
    """Make every recorded erasure physical (see the module docstring); returns counts."""
    lake = Lake.from_settings(settings.lake)
    out: dict[str, Any] = {"repaired": {name: done for name, done in repair(lake).items()
                                        if done["columns_added"] or done["files_rewritten"]}}
    erased = erasures(lake)
    out["erased_users"] = len(erased)
    if not erased:
        return out
    out["rows_deleted_again"] = _redelete_arrivals(lake, erased)
    out["files_deleted"] = {name: purge_table_history(lake.path(name)) for name in USER_TABLES}
    models = Path(settings.model.dir)
    out["bundles_scrubbed"] = scrub_bundles(models, erased)
    out["staging_deleted"] = scrub_staging(models, erased)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lake.erasure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    print(json.dumps(purge(load_settings()), sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
