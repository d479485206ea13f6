"""The lake: every Delta table read and written through delta-rs, with schemas enforced.

`Lake(root)` is the only way the project touches table files. Writers conform data to the
catalog schema in `lake.schemas` (a wrong type, a missing column or an extra one is an
error before anything is written) and retry commits that lose an optimistic-concurrency
race. Spark reaches the same tables through `lake.spark_bridge`.

Every table keeps its declared schema through every write path: a table lacking a catalog
column gains it on its next write (schema evolution; older files read as the column's
default), and the files delta-rs' deletes, merges and optimizes write are checked and, if
stored in other Arrow types than declared, rewritten (`lake.declared_types`). Reads return the
catalog's types and columns whatever the files hold.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Field, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from lake.config import LakeSettings
from lake.declared_types import restore_declared_types
from lake.schemas import TABLES, TableSpec
from lake.validation import validate_events_table


class LakeError(ValueError):
    """A request to the lake is invalid (unknown table, wrong schema, missing version...)."""


def _dnf_columns(filters: Any) -> list[str] | None:
    """The columns DNF tuple filters refer to; None for a pyarrow expression (or none)."""
    if not isinstance(filters, list | tuple) or not filters:
        return None
    groups = filters if isinstance(filters[0], list) else [filters]
    return list(dict.fromkeys(str(t[0]) for g in groups for t in g))


def _missing_version(dt: DeltaTable, name: str, version: int | str | datetime,
                     latest: int) -> str:
    if isinstance(version, int):
        return f"{name} has no version {version}: its versions go up to {latest}"
    if isinstance(version, str):
        try:
            datetime.fromisoformat(version.replace("Z", "+00:00"))
        except ValueError:
            return (f"{name}: cannot time-travel to {version!r}: expected a version number "
                    "or an ISO-8601 timestamp")
    return f"{name} has no version at {version} (latest version {latest})"


def spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise LakeError(f"unknown table {name!r}; tables: {sorted(TABLES)}") from None


def conform(table: pa.Table, s: TableSpec) -> pa.Table:
    """Cast `table` to the spec's schema, column by column, naming what does not fit.

    A missing nullable column is filled with nulls, or with its default (`TableSpec.defaults`),
    which also replaces the nulls of a column that has one."""
    names = set(table.column_names)
    extra = sorted(names - set(s.schema.names))
    if extra:
        raise LakeError(f"{s.name}: unknown column(s) {extra}")
    cols = []
    for f in s.schema:
        if f.name not in names:
            if not f.nullable:
                raise LakeError(f"{s.name}: required column {f.name!r} is missing")
            cols.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        try:
            col = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise LakeError(f"{s.name}.{f.name}: expected {f.type}, got {col.type}: {exc}") from exc
        if not f.nullable and col.null_count:
            raise LakeError(
                f"{s.name}.{f.name}: {col.null_count} null value(s) in a required column"
            )
        cols.append(col)
    return with_defaults(pa.table(cols, schema=s.schema), s)


def with_defaults(table: pa.Table, s: TableSpec) -> pa.Table:
    """`table` with the nulls of each column that has a default replaced by it."""
    for name, value in s.defaults:
        if name in table.column_names and table.column(name).null_count:
            i = table.column_names.index(name)
            col = pc.fill_null(table.column(name), pa.scalar(value, table.schema.field(i).type))
            table = table.set_column(i, table.schema.field(i), col)
    return table


def declared(table: pa.Table, s: TableSpec, columns: Sequence[str]) -> pa.Table:
    """`columns` of a table read from the lake in the catalog's types and field flags:
    view types cast back, columns its files predate filled with their default (or null)."""
    cols = []
    for name in columns:
        f = s.schema.field(name)
        if name in table.column_names:
            cols.append(table.column(name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    out = pa.table(cols, schema=pa.schema([s.schema.field(c) for c in columns]))
    return with_defaults(out, s)


def sql_literal(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, datetime | date):
        return f"'{v.isoformat()}'"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def partition_predicate(partitions: Sequence[Mapping[str, Any]]) -> str:
    """`[{'event_date': d1}, {'event_date': d2}]` -> "(event_date = 'd1') OR (...d2...)"."""
    if not partitions:
        raise LakeError("no partitions given")
    clauses = [
        " AND ".join(f"{k} = {sql_literal(v)}" for k, v in sorted(p.items())) for p in partitions
    ]
    return " OR ".join(f"({c})" for c in clauses)


class Lake:
    def __init__(self, root: Path | str, *, commit_retries: int = 8) -> None:
        self.root = Path(root)
        self.commit_retries = commit_retries
        self.commit_conflicts = 0
        """Writes this object retried because another writer committed first."""

    @classmethod
    def from_settings(cls, settings: LakeSettings) -> Lake:
        return cls(settings.root, commit_retries=settings.commit_retries)

    # -- locating ----------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / spec(name).name

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(str(self.path(name)))

    def ensure(self, name: str) -> DeltaTable:
        """Create the table empty with its catalog schema if it does not exist yet, or add
        the catalog columns it lacks (a table written before they existed)."""
        s = spec(name)
        p = self.path(name)
        if not self.exists(name):
            p.mkdir(parents=True, exist_ok=True)
            try:
                DeltaTable.create(
                    str(p), s.schema, mode="ignore", partition_by=list(s.partition_by) or None,
                    name=s.name, description=s.description,
                )
            except Exception:  # a concurrent creator won the race: fine if the table exists now
                if not self.exists(name):
                    raise
        dt = DeltaTable(str(p))
        failure: Exception | None = None
        for _ in range(self.commit_retries + 1):
            have = {f.name for f in dt.schema().fields}
            missing = [f for f in s.schema if f.name not in have]
            if not missing:
                return dt
            required = [f.name for f in missing if not f.nullable]
            if required:
                raise LakeError(f"{name}: the table lacks the required column(s) {required}; "
                                "only nullable columns can be added to an existing table")
            try:
                dt.alter.add_columns([Field.from_arrow(f) for f in missing],
                                     commit_properties=self._props())
            except (CommitFailedError, DeltaError) as exc:
                failure = exc  # a concurrent writer changed the table (maybe added them)
            dt = DeltaTable(str(p))
        raise LakeError(f"{name}: could not add the columns {[f.name for f in missing]}: "
                        f"{failure}") from failure

    def ensure_all(self) -> None:
        for name in TABLES:
            self.ensure(name)

    def delta(self, name: str, version: int | str | datetime | None = None) -> DeltaTable:
        """The DeltaTable at its latest version, or at `version` (number or timestamp)."""
        p = self.path(name)
        try:
            dt = DeltaTable(str(p))
        except TableNotFoundError:
            raise LakeError(f"table {name!r} does not exist at {p}") from None
        if version is not None:
            latest = dt.version()
            try:
                dt.load_as_version(version)
            except Exception as exc:
                # delta-kernel's own message is a multi-line internal error; say what exists.
                raise LakeError(_missing_version(dt, name, version, latest)) from exc
        return dt

    def version(self, name: str) -> int:
        return self.delta(name).version()

    # -- reading -----------------------------------------------------------------------
    def read(
        self,
        name: str,
        *,
        version: int | str | datetime | None = None,
        columns: list[str] | None = None,
        filters: Any = None,
    ) -> pa.Table:
        """Rows of table `name` (at `version`) in the catalog's schema.

        `filters`: DNF tuples (`[("user_id", "=", "u1")]`) or a pyarrow expression. Columns
        the table's files predate read as their default (or null).
        """
        s = spec(name)
        wanted = list(columns or s.schema.names)
        unknown = [c for c in wanted if c not in s.schema.names]
        if unknown:
            raise LakeError(f"{name}: unknown column(s) {unknown}")
        if not self.exists(name) and version is None:
            return s.schema.empty_table().select(wanted)
        dt = self.delta(name, version)
        fs = self._filesystem(name, dt)
        stored = {f.name for f in dt.schema().fields}
        try:
            table = dt.to_pyarrow_table(columns=[c for c in wanted if c in stored],
                                        filters=filters, filesystem=fs)
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid):
            if filters is None:
                raise
            # Files stored in other types than declared (view types: lake.declared_types), or
            # a filter on a column older files lack: pyarrow cannot apply the filter while
            # it scans. delta-rs prunes the files, the rows are filtered once declared.
            return self._read_then_filter(dt, s, stored, filters, fs).select(wanted)
        return declared(table, s, wanted)

    def _read_then_filter(self, dt: DeltaTable, s: TableSpec, stored: set[str], filters: Any,
                          fs: pafs.FileSystem | None) -> pa.Table:
        dnf = _dnf_columns(filters)
        prune = filters if dnf is not None and set(dnf) <= stored else None
        data = dt.to_pyarrow_dataset(file_pruning_predicate=prune, filesystem=fs).to_table(
            columns=[c for c in s.schema.names if c in stored])
        expr = filters if isinstance(filters, pads.Expression) \
            else pq.filters_to_expression(filters)
        return declared(data, s, s.schema.names).filter(expr)

    def _filesystem(self, name: str, dt: DeltaTable) -> pafs.FileSystem | None:
        """Arrow's own local filesystem rooted at the table directory, where usable.

        By default delta-rs hands Arrow a Python filesystem backed by its Rust object
        store; Arrow's I/O threads then call into that runtime, and at interpreter exit the
        process can abort with "terminate called without an active exception" (exit 134,
        delta-rs #2184). Arrow's LocalFileSystem avoids that path. delta-rs passes the log's
        URI-encoded file paths to a custom filesystem undecoded, so tables whose paths
        carry escapes ('%', from partition values such as "a b:c") keep the default.
        """
        paths = pa.table(dt.get_add_actions(flatten=False).select(["path"])).column("path")
        if any("%" in p or "://" in p or p.startswith("/") for p in paths.to_pylist()):
            return None
        return pafs.SubTreeFileSystem(str(self.path(name).resolve()), pafs.LocalFileSystem())

    def count(self, name: str, version: int | None = None) -> int:
        if not self.exists(name):
            return 0
        return int(self.delta(name, version).count())

    # -- writing -----------------------------------------------------------------------
    def _commit(self, fn: Any) -> int:
        """Run a write, retrying when another writer committed first."""
        delay = 0.05
        for attempt in range(self.commit_retries + 1):
            try:
                return int(fn())
            except CommitFailedError:
                if attempt == self.commit_retries:
                    raise
                self.commit_conflicts += 1
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def _props(self) -> CommitProperties:
        return CommitProperties(max_commit_retries=self.commit_retries)

    def append(
        self, name: str, data: pa.Table, *, app_transaction: tuple[str, int] | None = None
    ) -> int:
        """Append rows (schema-checked; events are validated) and return the new version.

        `app_transaction=(app_id, version)` records a Delta application transaction in
        the same commit, so an idempotent writer can later ask
        `DeltaTable.transaction_version(app_id)` what it already committed.
        """
        s = spec(name)
        table = self._prepare(s, data)
        self.ensure(name)
        p = str(self.path(name))
        props = self._props()
        if app_transaction is not None:
            app_id, txn_version = app_transaction
            props = CommitProperties(
                max_commit_retries=self.commit_retries,
                app_transactions=[Transaction(app_id=app_id, version=int(txn_version))],
            )

        def go() -> int:
            # Write through a DeltaTable object: afterwards it stands at *our* commit, where
            # re-opening the path could see a concurrent writer's later version.
            dt = DeltaTable(p)
            write_deltalake(dt, table, mode="append", partition_by=list(s.partition_by) or None,
                            commit_properties=props)
            return dt.version()

        return self._commit(go)

    def overwrite(
        self, name: str, data: pa.Table, *, partitions: Sequence[Mapping[str, Any]] | None = None
    ) -> int:
        """Replace exactly the given partitions (or the whole table when None) with `data`.

        Every row of `data` must fall inside the named partitions, so a rerun can never
        touch partitions it was not asked to rewrite.
        """
        s = spec(name)
        table = self._prepare(s, data)
        self.ensure(name)
        predicate = None
        if partitions is not None:
            allowed = {tuple(sorted(p.items())) for p in partitions}
            cols = sorted({k for p in partitions for k in p})
            if not set(cols) <= set(s.partition_by):
                raise LakeError(f"{name}: {cols} are not partition columns {list(s.partition_by)}")
            seen = {tuple(zip(cols, vals, strict=True))
                    for vals in zip(*(table.column(c).to_pylist() for c in cols), strict=True)}
            outside = seen - allowed
            if outside:
                raise LakeError(f"{name}: rows fall outside the partitions being overwritten: "
                                f"{sorted(outside)[:3]}")
            predicate = partition_predicate(partitions)
        p = str(self.path(name))

        def go() -> int:
            dt = DeltaTable(p)  # see append(): the object ends at our own commit
            write_deltalake(dt, table, mode="overwrite", predicate=predicate,
                            partition_by=list(s.partition_by) or None,
                            commit_properties=self._props())
            return dt.version()

        return self._commit(go)

    def upsert(self, name: str, data: pa.Table,
               update_columns: Sequence[str] | None = None) -> int:
        """Merge rows by the table's key: matching rows are updated, new ones inserted.

        Returns the new version (the merge's, or that of the commit which then restored
        the declared types of the files it wrote).

        `update_columns`: only these columns of matching rows are updated (a partial update:
        the others keep their values); new rows are inserted whole. Default: all columns.
        """
        s = spec(name)
        if not s.key:
            raise LakeError(f"{name} has no key to upsert by")
        table = self._prepare(s, data)
        dupes = table.group_by(list(s.key)).aggregate([([], "count_all")])
        if dupes.num_rows != table.num_rows:
            raise LakeError(f"{name}: duplicate keys {list(s.key)} within one upsert batch")
        self.ensure(name)
        p = str(self.path(name))
        pred = " AND ".join(f"t.{k} = s.{k}" for k in s.key)

        unknown = sorted(set(update_columns or ()) - set(table.column_names))
        if unknown:
            raise LakeError(f"{name}: cannot update unknown column(s) {unknown}")

        def go() -> int:
            dt = DeltaTable(p)
            merge = dt.merge(table, pred, source_alias="s", target_alias="t",
                             commit_properties=self._props())
            if update_columns is None:
                merge = merge.when_matched_update_all()
            else:
                merge = merge.when_matched_update({c: f"s.{c}" for c in update_columns})
            merge.when_not_matched_insert_all().execute()
            return dt.version()

        version = self._commit(go)
        return self._restore_declared_types(name, version) or version

    def delete(self, name: str, predicate: str) -> dict[str, Any]:
        """Delete the rows matching a SQL predicate; returns delta-rs' metrics."""
        if not self.exists(name):
            return {"num_deleted_rows": 0}
        p = str(self.path(name))
        metrics: dict[str, Any] = {}

        def go() -> int:
            dt = DeltaTable(p)
            metrics.update(dt.delete(predicate, commit_properties=self._props()))
            return dt.version()

        # a writer that committed first: delete again on the new snapshot
        version = self._commit(go)
        if metrics.get("num_added_files"):
            self._restore_declared_types(name, version)
        return metrics

    def coalesce_small_files(self, name: str, *, target_size: int | None = None) -> dict[str, Any]:
        """Rewrite each partition's small files into few large ones (delta-rs
        `optimize.compact`); the rows stay as they are (the commit says `dataChange: false`,
        so incremental readers of the log skip it). Returns delta-rs' metrics."""
        if not self.exists(name):
            return {"numFilesAdded": 0, "numFilesRemoved": 0}
        p = str(self.path(name))
        metrics: dict[str, Any] = {}

        def go() -> int:
            dt = DeltaTable(p)
            metrics.update(dt.optimize.compact(target_size=target_size,
                                               commit_properties=self._props()))
            return dt.version()

        version = self._commit(go)
        if metrics.get("numFilesAdded"):
            self._restore_declared_types(name, version)
        return metrics

    def _restore_declared_types(self, name: str, version: int) -> int | None:
        """delta-rs' DataFusion writers (delete, merge) store strings as `string_view`:
        swap the files commit `version` added for copies in the declared types. Returns
        the swap's version (None: nothing to swap). See `lake.declared_types`."""
        return restore_declared_types(self, spec(name), version)

    def _prepare(self, s: TableSpec, data: pa.Table) -> pa.Table:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if s.name in ("bronze_events", "silver_events"):
            return with_defaults(validate_events_table(data), s)
        return conform(data, s)

    # -- inspection --------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """One row per catalog table: name, version, rows, files, partition columns."""
        out = []
        for name, s in TABLES.items():
            if self.exists(name):
                dt = self.delta(name)
                out.append({"table": name, "version": dt.version(), "rows": int(dt.count()),
                            "files": len(dt.file_uris()),
                            "partitioned_by": ",".join(s.partition_by)})
            else:
                out.append({"table": name, "version": None, "rows": 0, "files": 0,
                            "partitioned_by": ",".join(s.partition_by)})
        return out
