"""Erasure made physical: after `purge()`, no table version, model bundle or staged model on
disk holds a trace of an erased user beyond their `user_erasures` record.

`ForgetUser` deletes the user's rows at once, but a Delta delete is logical: the files
holding the rows stay for time travel, and the transaction log keeps their statistics. A
model bundle and the staged model of a run keep the user's id, factors and history. The
compliance step (`python -m lake.erasure`, the nightly `lambdarec_erasure` DAG; at most
24 h after the ForgetUser call plus the purge's own run time) therefore:

1. deletes again the erased users' rows that arrived before their erasure from bronze and
   silver (a compaction that read bronze before the delete may have written them later);
2. for every table that holds user ids: deletes the data files the log marks as removed,
   writes a checkpoint and drops every log entry before it (so no earlier version, and no
   file statistics naming the user, can be read any more);
3. rewrites every bundle trained before an erasure without the user (ids, factors,
   history; checksums renewed) and deletes staged models that hold an erased user (older
   than an hour: a younger one may belong to a running pipeline; the next purge gets it).

Files a writer has not committed yet are never touched (only files the log removed), so
the purge may run while servers ingest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
import scipy.sparse as sp
from deltalake import DeltaTable

from lake.bundle import MANIFEST, file_meta, list_versions, read_bundle, read_manifest
from lake.config import Settings, load_settings
from lake.foldin import gramian
from lake.schemas import (
    BRONZE_EVENTS,
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
)
"""Every table holding user ids (besides the erasure records themselves)."""
ARRIVAL_TABLES: tuple[str, ...] = (BRONZE_EVENTS.name, SILVER_EVENTS.name)
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
            pred = (f"user_id = {sql_literal(user)} AND received_at <= "
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
        for line in commit.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
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
def scrub_bundle(path: Path, users: set[str]) -> int:
    """Rewrite a bundle without `users` (ids, factors, history, user gram, checksums);
    returns how many it held. Each file is replaced atomically, the manifest last: a
    reader in between fails the checksum and keeps its serving model."""
    bundle = read_bundle(path)
    ids = bundle.user_ids
    drop = np.isin(ids, np.array(sorted(users), dtype=ids.dtype))
    if not drop.any():
        return 0
    keep = ~drop
    factors = np.ascontiguousarray(bundle.user_factors[keep])
    items = sp.csr_matrix(bundle.user_items[keep], dtype=np.float32)
    arrays: dict[str, Any] = {
        "user_ids.npy": ids[keep], "user_factors.npy": factors,
        "user_gram.npy": gramian(factors),
    }
    manifest = dict(bundle.manifest)
    files = dict(manifest["files"])
    for name, arr in [*arrays.items(), ("user_items.npz", items)]:
        tmp = path / f".{name}.tmp"
        with tmp.open("wb") as f:
            if name.endswith(".npz"):
                np.savez(f, indptr=arr.indptr, indices=arr.indices, data=arr.data)
            else:
                np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / name)
        files[name] = file_meta(path / name)
    manifest["files"] = files
    manifest["n_users"] = int(keep.sum())
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path / MANIFEST)
    return int(drop.sum())


def scrub_bundles(models_dir: Path, erased: dict[str, datetime]) -> dict[str, int]:
    """Remove users from every bundle trained before their erasure."""
    out: dict[str, int] = {}
    for version in list_versions(models_dir):
        path = models_dir / version
        since = trained_from(read_manifest(path))
        users = {u for u, at in erased.items() if since is None or at >= since}
        if users:
            n = scrub_bundle(path, users)
            if n:
                out[version] = n
    return out


def scrub_staging(models_dir: Path, erased: dict[str, datetime]) -> list[str]:
    """Delete staged models (older than an hour) that hold an erased user."""
    staging = models_dir / "staging"
    removed: list[str] = []
    if not staging.is_dir():
        return removed
    wanted = np.array(sorted(erased), dtype=str)
    for run in sorted(p for p in staging.iterdir() if p.is_dir()):
        arrays = run / "arrays.npz"
        if not arrays.exists() or time.time() - arrays.stat().st_mtime < STAGING_MIN_AGE_S:
            continue
        with np.load(arrays, allow_pickle=False) as z:
            holds = bool(np.isin(z["user_ids"], wanted).any())
        if holds:
            shutil.rmtree(run)
            removed.append(run.name)
    return removed


# -- the compliance step -----------------------------------------------------------------
def purge(settings: Settings) -> dict[str, Any]:
    """Make every recorded erasure physical (see the module docstring); returns counts."""
    lake = Lake.from_settings(settings.lake)
    erased = erasures(lake)
    out: dict[str, Any] = {"erased_users": len(erased)}
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
