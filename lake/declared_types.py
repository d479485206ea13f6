"""Every data file of the lake in its table's declared types: the swap of mistyped files.

delta-rs 1.6.6 writes the files of its DataFusion-based operations (DELETE, UPDATE, MERGE)
with Arrow view types: the Arrow schema embedded in each file declares every string
column `string_view` (delta-rs #4579). PyArrow reads such a column as `string_view`, which
its comparison kernels do not take, so once a delete has rewritten a file, every filtered
read of the table (`to_pyarrow_table(filters=[("user_id", "=", ...)])`) fails with
`ArrowNotImplementedError`. Appends, partition overwrites and optimize write the declared
types (optimize even casts mistyped files back when it merges them).

`Lake` therefore checks the files each of its deletes, merges and optimizes added
(`restore_declared_types`) and swaps every file whose types differ from the catalog for a
copy written with pyarrow in the declared types, in a second commit marked `dataChange:
false` (the rows are the same: incremental readers of the log skip it, and a writer that
removed the file meanwhile makes the swap fail and retry on the new snapshot). A lake
written before that (or by another tool) is swapped whole (`rewrite_mistyped`) by the
repair command, `python -m lake.repair`.

This module sits below `lake.tables`: it works on any object with the few `Lake` members
it needs (`TableStore`) and on the catalog's `TableSpec`s, never on `Lake` itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from lake.delta_files import WRITE_ID, commit_version, file_stats, partition_values
from lake.delta_log import commit_actions, commit_file
from lake.schemas import TableSpec

log = logging.getLogger(__name__)

WRITER = "lambdarec.repair"
"""`lambdarec.writer` of the commits that swap mistyped files (see the table history)."""


class TableStore(Protocol):
    """What the swap needs of a lake (`lake.tables.Lake` is one)."""

    commit_retries: int
    """delta-rs' own commit retries, passed on to the swap's commit."""

    def exists(self, name: str) -> bool:
        """Whether table `name` exists."""
        ...

    def path(self, name: str) -> Path:
        """The directory of table `name`."""
        ...

    def delta(self, name: str) -> DeltaTable:
        """Table `name` at its latest version, freshly opened."""
        ...

    def _commit(self, fn: Callable[[], int]) -> int:
        """Run a write `fn` (returning its version), retrying when another writer won."""
        ...


def _data_fields(s: TableSpec) -> dict[str, pa.Field]:
    """The catalog fields stored inside the data files (partition values live in paths)."""
    return {f.name: f for f in s.schema if f.name not in s.partition_by}


def _decoded(path: str) -> str:
    return unquote(path.removeprefix("file://"))


def _local(root: Path, log_path: str) -> Path:
    p = _decoded(log_path)
    return Path(p) if p.startswith("/") else root / p


def stored_type_problems(path: Path | str, s: TableSpec) -> list[str]:
    """'column: stored type, declared type' for each column of a data file whose Arrow type
    (as the file's footer declares it) is not the catalog's; [] when all agree. Columns
    the file lacks are not a problem (they read as their default)."""
    want = _data_fields(s)
    return [f"{f.name}: {f.type}, declared {want[f.name].type}"
            for f in pq.read_schema(path) if f.name in want and f.type != want[f.name].type]


def _live_files(dt: DeltaTable, cols: Sequence[str],
                wanted: set[str] | None = None) -> list[dict[str, Any]]:
    """One dict per file of the snapshot (or per one of the decoded paths `wanted`): log
    path, size and partition values (strings)."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    out = []
    for i, path in enumerate(actions.column("path").to_pylist()):
        if wanted is not None and _decoded(path) not in wanted:
            continue
        pv = {c: actions.column(f"partition.{c}")[i].as_py() for c in cols}
        out.append({"path": path, "size": actions.column("size_bytes")[i].as_py(),
                    "partition_values": partition_values([pv])[0] if cols else {}})
    return out


def _commit_adds(table_path: Path, version: int) -> set[str] | None:
    """Decoded paths of the files commit `version` added (None: its log entry is gone)."""
    try:
        text = commit_file(table_path, version).read_text()
    except FileNotFoundError:
        return None
    return {_decoded(a["add"]["path"]) for a in commit_actions(text) if "add" in a}


def _rewrite(root: Path, s: TableSpec, f: dict[str, Any], now_ms: int,
             written: list[Path]) -> list[AddAction | RemoveAction]:
    """A copy of file `f` in the declared types next to it, and the actions swapping it in."""
    want = _data_fields(s)
    table = pq.read_table(_local(root, f["path"]))
    fields = [want.get(c.name, c) for c in table.schema]
    table = pa.table([col.cast(fd.type) for col, fd in zip(table.columns, fields, strict=True)],
                     schema=pa.schema(fields))
    rel_dir = os.path.dirname(_decoded(f["path"]))
    rel = os.path.join(rel_dir, f"part-{uuid.uuid4().hex}-c000.snappy.parquet")
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    written.append(target)
    pq.write_table(table, target)
    _, stats = file_stats(str(target), table.column_names)
    st = target.stat()
    return [
        RemoveAction(path=f["path"], data_change=False, deletion_timestamp=now_ms,
                     size=f["size"], partition_values=f["partition_values"]),
        AddAction(path=rel, size=st.st_size, partition_values=f["partition_values"],
                  modification_time=int(st.st_mtime * 1000), data_change=False,
                  stats=json.dumps(stats, separators=(",", ":"))),
    ]


def rewrite_mistyped(lake: TableStore, s: TableSpec, only: Iterable[str] | None = None) -> int:
    """Swap every live file of table `s` (or of the decoded paths `only`) whose stored types
    differ from the catalog for a copy in the declared types, in one commit; returns how
    many files were swapped. Retried on a fresh snapshot when another writer won."""
    return _swap_mistyped(lake, s, only)[0]


def _swap_mistyped(lake: TableStore, s: TableSpec,
                   only: Iterable[str] | None) -> tuple[int, int | None]:
    """`rewrite_mistyped`: (files swapped, the swap's version or None when none was needed)."""
    name = s.name
    if not lake.exists(name):
        return 0, None
    root = lake.path(name).resolve()
    wanted = None if only is None else set(only)
    swapped = 0

    def go() -> int:
        nonlocal swapped
        dt = lake.delta(name)
        bad = [f for f in _live_files(dt, s.partition_by, wanted)
               if stored_type_problems(_local(root, f["path"]), s)]
        if not bad:
            return dt.version()
        write_id = uuid.uuid4().hex
        written: list[Path] = []
        try:
            now_ms = int(time.time() * 1000)
            actions = [a for f in bad for a in _rewrite(root, s, f, now_ms, written)]
            dt.create_write_transaction(
                actions, mode="append", schema=dt.schema(),
                partition_by=list(s.partition_by) or None,
                commit_properties=CommitProperties(
                    max_commit_retries=lake.commit_retries,
                    custom_metadata={"lambdarec.writer": WRITER, WRITE_ID: write_id}))
        except BaseException:
            # Our copies are table data once the commit is in the log: keep them then.
            try:
                landed = commit_version(lake.delta(name), write_id) is not None
            except Exception:  # the log cannot tell: keep them (an orphan costs disk only)
                landed = True
            if not landed:
                for p in written:
                    p.unlink(missing_ok=True)
            raise
        swapped = len(bad)
        log.info("%s: %d file(s) rewritten in the declared types", name, swapped)
        # our own commit's version, not whatever is latest after a concurrent writer's
        version = commit_version(lake.delta(name), write_id)
        return dt.version() if version is None else version

    version = lake._commit(go)
    return swapped, version if swapped else None


def restore_declared_types(lake: TableStore, s: TableSpec, version: int) -> int | None:
    """After delta-rs commit `version` of table `s` (a delete, merge or optimize): swap the
    files it added that it wrote in other types than the catalog's. Returns the version of
    the swap, None when no file needed one."""
    added = _commit_adds(lake.path(s.name), version)
    if added is not None and not added:
        return None
    # added None: the commit's log entry is gone (cleaned up), so look at every file
    return _swap_mistyped(lake, s, added)[1]
