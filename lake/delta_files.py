"""What a writer that commits its own Parquet files with delta-rs needs to describe them.

The Spark bridge (`lake.spark_bridge`) and the swap of mistyped files
(`lake.declared_types`) both write Parquet with pyarrow and commit the files as `AddAction`s
of a delta-rs transaction. This module holds what they share: the footer statistics of a
file in Delta's stats JSON (`file_stats`), partition values in Delta's string serialisation
(`partition_str`, `partition_values`), and how a writer finds the version of its own commit
(`WRITE_ID` in the commit metadata, `commit_version`). It knows nothing of `Lake`: it works
on files, values and `DeltaTable`s only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

import pyarrow.parquet as pq
from deltalake import DeltaTable

WRITE_ID = "lambdarec.write_id"
"""Commit metadata key naming the write (a `write_table` call, a swap) that made a commit."""
HISTORY_SCANS = (8, 1000)
"""How many recent commits `commit_version` reads for a write id: a few first (the own
commit is nearly always among the newest), then many (a burst of concurrent writers)."""


def partition_str(v: Any) -> str:
    """A partition value in Delta's string serialisation."""
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def partition_values(partitions: Sequence[Mapping[str, Any]]) -> list[dict[str, str | None]]:
    """Partition dicts with Delta-serialised values (handy for logs and tests)."""
    return [{k: None if v is None else partition_str(v) for k, v in p.items()}
            for p in partitions]


def _stat_value(v: Any) -> Any:
    """A Parquet min/max statistic as Delta stats JSON (None when it should be left out)."""
    if isinstance(v, datetime):
        v = v if v.tzinfo else v.replace(tzinfo=UTC)
        v = v.astimezone(UTC)
        return v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return v
    return None


def file_stats(path: str, columns: Sequence[str]) -> tuple[int, dict[str, Any]]:
    """Row count and Delta stats (numRecords, nullCount, minValues, maxValues) from a footer."""
    md = pq.read_metadata(path)
    want = set(columns)
    nulls: dict[str, int] = {}
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    no_minmax: set[str] = set()
    no_nulls: set[str] = set()
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        if group.num_rows == 0:
            continue
        for j in range(group.num_columns):
            col = group.column(j)
            name = col.path_in_schema
            if name not in want:  # nested leaves ("factors.list.element") carry no top-level stats
                continue
            st = col.statistics
            if st is None or st.null_count is None:
                no_nulls.add(name)
            else:
                nulls[name] = nulls.get(name, 0) + st.null_count
            if st is None or not st.has_min_max:
                if st is None or st.null_count != group.num_rows:  # all-null chunk: no min/max
                    no_minmax.add(name)
                continue
            lo, hi = _stat_value(st.min), _stat_value(st.max)
            if lo is None or hi is None:
                no_minmax.add(name)
                continue
            mins[name] = lo if name not in mins else min(mins[name], lo)
            maxs[name] = hi if name not in maxs else max(maxs[name], hi)
    for name in no_minmax:
        mins.pop(name, None)
        maxs.pop(name, None)
    for name in no_nulls:
        nulls.pop(name, None)
    stats: dict[str, Any] = {"numRecords": md.num_rows, "nullCount": nulls}
    if mins:
        stats["minValues"] = mins
        stats["maxValues"] = maxs
    return md.num_rows, stats


def commit_version(table: DeltaTable, write_id: str) -> int | None:
    """The version of the commit `write_id` made in `table`, or None if none did.

    Args:
        table: the table, freshly opened (its history is read from the log as it is now).
        write_id: the `WRITE_ID` value the writer put in its commit's metadata.
    """
    for limit in HISTORY_SCANS:
        history = table.history(limit)
        for entry in history:
            if entry.get(WRITE_ID) == write_id:
                return int(entry["version"])
        if len(history) < limit:
            return None  # the whole log was read
    return None
