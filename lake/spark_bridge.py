"""The one bridge between Spark and the Delta tables of the lake (delta-rs is the Delta engine).

There are no delta-spark jars on these machines, so Spark never sees `format("delta")`:

- `read_table` asks delta-rs which Parquet files make up a snapshot and has Spark read
  exactly those files with the catalog's explicit schema. Partition values (not stored in
  the files) come back from the hive-style directory names, after checking on the driver
  that every file's directory agrees with the partition values in the Delta log; if any
  file does not, the table is read per partition and the values from the log are attached
  as literals. Either way nothing but the file list touches the driver.
- `write_table` has the Spark tasks write Parquet (with pyarrow) into a private staging
  directory under the table root, moves the files into their hive-style partition
  directories, reads only their footers (row counts, null counts, min/max) and commits
  them as one Delta transaction with delta-rs: an append, or an overwrite of exactly the
  named partitions (or of the whole table). Files that are not in the log are invisible
  to every Delta reader, so a failure before the commit changes nothing.

- `write_table` also takes an Arrow table built in the driver (the jobs' Arrow engine,
  `spark_jobs.engine`) and commits it the same way.

On a cluster with delta-spark these functions are the only code to swap for
`spark.read.format("delta")` / `df.write.format("delta")`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, Transaction
from deltalake.transaction import AddAction, RemoveAction

from lake.delta_files import WRITE_ID, commit_version, file_stats, partition_str
from lake.schemas import TableSpec
from lake.tables import Lake, LakeError, conform, spec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
STAGING_DIR = "_staging"
STALE_STAGING_S = 24 * 3600
"""A staging directory this old belongs to a writer that died (kill -9): swept by the next
write. Younger ones may belong to a writer still running and are left alone."""


class SchemaMismatchError(LakeError):
    """A DataFrame does not fit the catalog schema of the table it is written to."""


# -- schemas -----------------------------------------------------------------------------
def spark_schema(s: TableSpec, *, data_only: bool = False) -> StructType:
    """The catalog's Arrow schema as a Spark StructType (optionally without partition columns)."""
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructType

    struct = from_arrow_schema(s.schema, prefer_timestamp_ntz=False)
    if data_only:
        return StructType([f for f in struct.fields if f.name not in s.partition_by])
    return struct


def _loose(t: DataType) -> DataType:
    """`t` with every nullability flag set, so types compare on shape alone."""
    from pyspark.sql.types import ArrayType, MapType, StructField, StructType

    if isinstance(t, ArrayType):
        return ArrayType(_loose(t.elementType), True)
    if isinstance(t, MapType):
        return MapType(_loose(t.keyType), _loose(t.valueType), True)
    if isinstance(t, StructType):
        return StructType([StructField(f.name, _loose(f.dataType), True) for f in t.fields])
    return t


def _widens(got: DataType, want: DataType) -> bool:
    """Lossless numeric widenings accepted on write (cast before writing)."""
    from pyspark.sql.types import (
        ByteType,
        DoubleType,
        FloatType,
        IntegerType,
        LongType,
        ShortType,
    )

    if isinstance(want, LongType):
        return isinstance(got, ByteType | ShortType | IntegerType)
    if isinstance(want, DoubleType):
        return isinstance(got, FloatType | ByteType | ShortType | IntegerType)
    return False


def conform_df(df: DataFrame, s: TableSpec) -> DataFrame:
    """Check `df` against the catalog schema and return it with columns in catalog order.

    Accepted: exact types (nullability aside), lossless numeric widenings (int -> bigint,
    float -> double), and missing *nullable* columns (filled with nulls, or with the
    column's default, which also replaces its nulls: `TableSpec.defaults`). Anything else
    raises SchemaMismatchError naming the table and column.
    """
    from pyspark.sql import functions as F

    defaults = s.default_values
    want = {f.name: f for f in spark_schema(s).fields}
    got = {f.name: f for f in df.schema.fields}
    extra = [c for c in got if c not in want]
    if extra:
        raise SchemaMismatchError(f"{s.name}: unknown column(s) {extra}; expected {list(want)}")
    cols = []
    for name, wf in want.items():
        if name not in got:
            if not wf.nullable:
                raise SchemaMismatchError(f"{s.name}: required column {name!r} is missing")
            cols.append(F.lit(defaults.get(name)).cast(wf.dataType).alias(name))
            continue
        gt, wt = got[name].dataType, wf.dataType
        if _loose(gt) == _loose(wt) and name in defaults:
            cols.append(F.coalesce(F.col(name), F.lit(defaults[name])).alias(name))
        elif _loose(gt) == _loose(wt):
            cols.append(F.col(name))
        elif _widens(gt, wt):
            cols.append(F.col(name).cast(wt).alias(name))
        else:
            hint = ""
            if gt.typeName() == "timestamp_ntz":
                hint = " (timestamps must be UTC TimestampType, not TIMESTAMP_NTZ)"
            raise SchemaMismatchError(
                f"{s.name}.{name}: expected {wt.simpleString()}, got {gt.simpleString()}{hint}"
            )
    return df.select(*cols)


# -- reading -----------------------------------------------------------------------------
def _local_path(root: Path, log_path: str) -> str:
    """A Delta log path (URI-encoded, relative or absolute) as a plain local path."""
    if "://" in log_path:
        scheme, rest = log_path.split("://", 1)
        if scheme != "file":
            raise LakeError(f"only local tables are supported by the bridge, got {log_path}")
        return unquote(rest)
    p = unquote(log_path)
    return p if p.startswith("/") else str(root / p)


def _decoded(path: str) -> str:
    """`path` percent-decoded until stable: a comparison key, never a path to open."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    for _ in range(5):
        nxt = unquote(path)
        if nxt == path:
            break
        path = nxt
    return path.strip("/")


def _hive_consistent(rel_paths: Sequence[str], parts: Sequence[dict[str, str | None]],
                     cols: Sequence[str]) -> bool:
    """True when each file sits in `<col>=<value>/...` dirs that equal its log partition values."""
    for rel, pv in zip(rel_paths, parts, strict=True):
        if "://" in rel or rel.startswith("/"):
            return False
        dirs = unquote(rel).split("/")[:-1]
        if len(dirs) != len(cols):
            return False
        found: dict[str, str | None] = {}
        for d in dirs:
            if "=" not in d:
                return False
            k, v = d.split("=", 1)
            found[k] = None if v == HIVE_NULL else unquote(v)
        if found != {c: pv.get(c) for c in cols}:
            return False
    return True


def read_table(
    spark: SparkSession,
    lake: Lake,
    name: str,
    version: int | None = None,
    *,
    partition_filter: str | None = None,
) -> DataFrame:
    """A Spark DataFrame over one snapshot of a lake table, with the catalog schema.

    Args:
        spark: the session (see `lake.spark_session.get_spark`).
        lake: the lake holding the table.
        name: catalog table name.
        version: Delta version to read (time travel); the latest when None.
        partition_filter: optional SQL predicate on partition columns, e.g.
            "event_date >= '2024-01-01'"; files are pruned by delta-rs before Spark
            sees them (filters on data columns prune by file statistics, so apply them
            again on the DataFrame for exact results).

    Returns:
        A DataFrame with exactly the catalog's columns in catalog order. A table that
        does not exist yet (and no version asked for) reads as an empty DataFrame.
    """
    s = spec(name)
    full = spark_schema(s)
    if version is None and not lake.exists(name):
        return spark.createDataFrame([], full)
    dt = lake.delta(name, version)
    root = lake.path(name)
    actions = pa.table(dt.get_add_actions(flatten=True))
    if partition_filter is not None:
        try:
            keep = set(dt.file_uris(file_pruning_predicate=partition_filter))
        except Exception as exc:
            raise LakeError(f"{name}: bad partition_filter {partition_filter!r}: {exc}") from exc
        # file_uris() and the log encode paths differently: match on fully decoded suffixes
        kept = {"/".join(parts[-k:]) for u in keep
                for parts in [_decoded(u).split("/")] for k in range(1, len(parts) + 1)}
        mask = pa.array([_decoded(p) in kept for p in actions.column("path").to_pylist()],
                        type=pa.bool_())  # typed: an empty log gives an empty mask
        actions = actions.filter(mask)
    if actions.num_rows == 0:
        return spark.createDataFrame([], full)
    rel = actions.column("path").to_pylist()
    files = [_local_path(root, p) for p in rel]
    cols = list(s.partition_by)
    if not cols:
        return spark.read.schema(full).parquet(*files).select(*full.names)
    parts: list[dict[str, str | None]] = [
        {c: actions.column(f"partition.{c}")[i].as_py() for c in cols}
        for i in range(actions.num_rows)
    ]
    parts = [{c: (None if v is None else partition_str(v)) for c, v in p.items()} for p in parts]
    if _hive_consistent(rel, parts, cols):
        df = spark.read.schema(full).option("basePath", str(root)).parquet(*files)
        return df.select(*full.names)
    return _read_per_partition(spark, s, files, parts)


def _read_per_partition(spark: SparkSession, s: TableSpec, files: list[str],
                        parts: list[dict[str, str | None]]) -> DataFrame:
    """Fallback for files outside hive-style dirs: one read per partition, values as literals."""
    from functools import reduce

    from pyspark.sql import functions as F

    full = spark_schema(s)
    data = spark_schema(s, data_only=True)
    groups: dict[tuple[tuple[str, str | None], ...], list[str]] = {}
    for f, p in zip(files, parts, strict=True):
        groups.setdefault(tuple(sorted(p.items())), []).append(f)
    frames = []
    for key, group in groups.items():
        df = spark.read.schema(data).parquet(*group)
        for c, v in key:
            df = df.withColumn(c, F.lit(v).cast(full[c].dataType))
        frames.append(df.select(*full.names))
    return reduce(lambda a, b: a.unionByName(b), frames)


# -- writing -----------------------------------------------------------------------------
def _sweep_stale_staging(base: Path) -> None:
    """Remove staging directories (named `<epoch ms>-<uuid>`) older than STALE_STAGING_S."""
    if not base.is_dir():
        return
    cutoff_ms = (time.time() - STALE_STAGING_S) * 1000
    for d in base.iterdir():
        stamp = d.name.split("-", 1)[0]
        if stamp.isdigit() and int(stamp) < cutoff_ms:
            shutil.rmtree(d, ignore_errors=True)


def _written_files(staging: Path) -> list[Path]:
    return sorted(
        p for p in staging.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(staging).parts)
    )


def _parse_dirs(rel: Path, cols: Sequence[str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for d in rel.parts[:-1]:
        k, _, v = d.partition("=")
        values[k] = None if v == HIVE_NULL else unquote(v)
    if sorted(values) != sorted(cols):
        raise LakeError(f"unexpected partition directories in {rel}; expected columns {cols}")
    return values


STAGED_ROW_GROUP = 131_072
"""Rows buffered per partition value before a task writes them as one Parquet row group."""
STAGED_BUFFER_ROWS = 1_048_576
"""Rows a task buffers over all its partition values before it writes them all out."""


def write_staged(df: DataFrame, staging: Path, cols: Sequence[str]) -> int:
    """Every Spark task writes its rows into `staging` with pyarrow (`write_partitioned`).

    Spark's own partitioned Parquet writer costs ~11 ms a file here (Hadoop output
    committer, checksum files): 10 of MovieLens-1M's 26 s compaction, with ~900 event
    dates. pyarrow writes a small file in ~1 ms. As with Spark's writer, executors need
    `staging` on a file system they share with the driver.

    Returns:
        The number of files written.
    """
    target = str(staging)
    keys = list(cols)

    def write(batches: Any) -> Any:
        n = write_partitioned(batches, target, keys)
        yield pa.RecordBatch.from_pydict({"files": pa.array([n], pa.int64())})

    return sum(r["files"] for r in df.mapInArrow(write, "files long").collect())


def write_partitioned(batches: Any, target: str, keys: Sequence[str]) -> int:
    """Write Arrow batches under `target`: one Parquet file per partition value they hold,
    in hive-style directories, rows in the batches' order. Returns the number of files."""
    task = uuid.uuid4().hex
    writers: dict[tuple[str, ...], pq.ParquetWriter] = {}
    pending: dict[tuple[str, ...], list[pa.Table]] = {}
    rows: dict[tuple[str, ...], int] = {}

    def flush(key: tuple[str, ...]) -> None:
        part = pa.concat_tables(pending.pop(key))
        rows.pop(key)
        w = writers.get(key)
        if w is None:
            d = os.path.join(target, *(f"{c}={v}" for c, v in zip(keys, key, strict=True)))
            os.makedirs(d, exist_ok=True)
            w = writers[key] = pq.ParquetWriter(os.path.join(d, f"part-{task}.parquet"),
                                                part.schema)
        w.write_table(part, row_group_size=len(part) or None)

    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            t = pa.Table.from_batches([batch])
            for key, part in _split_by_partition(t, keys):
                pending.setdefault(key, []).append(part)
                rows[key] = rows.get(key, 0) + part.num_rows
                if rows[key] >= STAGED_ROW_GROUP:
                    flush(key)
            if sum(rows.values()) >= STAGED_BUFFER_ROWS:
                for key in list(pending):
                    flush(key)
        for key in list(pending):
            flush(key)
    finally:
        for w in writers.values():
            w.close()
    return len(writers)


def _split_by_partition(t: pa.Table, cols: Sequence[str]) -> list[tuple[tuple[str, ...], pa.Table]]:
    """(directory values, rows without the partition columns) per partition value in `t`.

    One pass: row indices grouped by value (nulls are a group), then one `take` each, so a
    task holding many dates costs O(rows), not O(rows x dates) masks."""
    import numpy as np

    if not cols:
        return [((), t)]
    data = t.drop_columns(list(cols))
    rows = pa.array(np.arange(t.num_rows, dtype=np.int64))
    groups = (t.select(list(cols)).append_column("__row", rows)
              .group_by(list(cols), use_threads=False).aggregate([("__row", "list")]))
    if groups.num_rows == 1:
        return [(tuple(_dir_value(groups[c][0].as_py()) for c in cols), data)]
    members = groups["__row_list"]
    return [(tuple(_dir_value(groups[c][i].as_py()) for c in cols), data.take(members[i].values))
            for i in range(groups.num_rows)]


def _dir_value(v: Any) -> str:
    """A partition value as a hive-style directory name (`_parse_dirs` reverses it)."""
    return HIVE_NULL if v is None else quote(partition_str(v), safe=" -._")


def write_table(
    df: DataFrame | pa.Table,
    lake: Lake,
    name: str,
    *,
    mode: Literal["append", "overwrite"],
    partitions: list[dict[str, Any]] | None = None,
    app_transaction: tuple[str, int] | None = None,
) -> int:
    """Write a DataFrame into a lake table as one Delta commit and return the new version.

    Args:
        df: rows to write; its schema must fit the catalog (see `conform_df`). An Arrow
            table (built in the driver: the jobs' Arrow engine) is cast to the catalog
            schema (`lake.tables.conform`) and written here, in its row order, instead of
            by Spark tasks; the same files, checks and commit.
        lake: the lake holding the table (the table is created when missing).
        name: catalog table name.
        mode: "append" adds the rows; "overwrite" replaces the named `partitions`, or the
            whole table when `partitions` is None.
        partitions: for overwrite, e.g. `[{"event_date": date(2024, 1, 1)}]`. Every row
            of `df` must fall into one of them, so a rerun rewrites only its own
            partitions. Named partitions that get no rows end up empty.
        app_transaction: `(app_id, version)` recorded as a Delta application transaction
            in the same commit (read back with `DeltaTable.transaction_version(app_id)`),
            so what a job has processed is committed atomically with its output.

    Returns:
        The table version after the commit (the current version when an append has no
        rows, since there is nothing to commit).

    Raises:
        SchemaMismatchError: the DataFrame does not fit the catalog schema.
        LakeError: bad arguments, rows outside the named partitions, nulls in a
            required column. Nothing is committed in any of these cases.
    """
    s = spec(name)
    wanted = _wanted_partitions(s, mode, partitions)
    if isinstance(df, pa.Table):
        table = conform(df, s)
        return _commit_staged(
            lake, s, mode, wanted, app_transaction,
            lambda staging, cols: write_partitioned(table.to_batches(), str(staging), cols))
    sdf = conform_df(df, s)
    return _commit_staged(lake, s, mode, wanted, app_transaction,
                          lambda staging, cols: write_staged(sdf, staging, cols))


Partitions = set[tuple[tuple[str, str | None], ...]]


def _wanted_partitions(s: TableSpec, mode: str,
                       partitions: list[dict[str, Any]] | None) -> Partitions | None:
    """Check the write's arguments; the partitions to overwrite as comparable keys."""
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
    if partitions is None:
        return None
    cols = list(s.partition_by)
    if mode != "overwrite":
        raise ValueError("partitions= is only valid with mode='overwrite'")
    if not partitions:
        raise ValueError("partitions= must name at least one partition (or be None)")
    for p in partitions:
        if sorted(p) != sorted(cols):
            raise LakeError(f"{s.name}: partition {p} must name exactly the partition "
                            f"columns {cols}")
    return {tuple(sorted((k, None if v is None else partition_str(v)) for k, v in p.items()))
            for p in partitions}


def _commit_staged(lake: Lake, s: TableSpec, mode: str, wanted: Partitions | None,
                   app_transaction: tuple[str, int] | None,
                   stage: Callable[[Path, list[str]], object]) -> int:
    """Have `stage(staging_dir, partition_cols)` write the files, then check them, move
    them into place and commit them as one Delta transaction (see `write_table`)."""
    name = s.name
    cols = list(s.partition_by)
    lake.ensure(name)
    root = lake.path(name)
    _sweep_stale_staging(root / STAGING_DIR)
    write_id = uuid.uuid4().hex
    staging = root / STAGING_DIR / f"{int(time.time() * 1000)}-{write_id}"
    moved: list[Path] = []
    try:
        stage(staging, cols)
        actions = _stage_actions(s, staging, root, cols, wanted, moved)
        if not actions and mode == "append":
            return lake.version(name)
        schema = lake.delta(name).schema()
        props = CommitProperties(
            max_commit_retries=lake.commit_retries,
            custom_metadata={"lambdarec.writer": "spark_bridge", WRITE_ID: write_id},
            app_transactions=None if app_transaction is None else [
                Transaction(app_id=app_transaction[0], version=int(app_transaction[1]))],
        )
        filters, by_remove = _overwrite_filters(cols, wanted)

        def commit() -> int:
            t = lake.delta(name)
            todo: list[Any] = list(actions)
            commit_mode = mode
            if by_remove:
                todo += _remove_actions(t, cols, wanted or set())
                commit_mode = "append"
            t.create_write_transaction(
                todo, mode=commit_mode, schema=schema, partition_by=cols or None,
                partition_filters=filters, commit_properties=props,
            )
            # our own commit's version, not whatever is latest once a concurrent writer
            # committed after us
            version = commit_version(lake.delta(name), write_id)
            if version is None:
                raise LakeError(f"{name}: commit {write_id} is not in the table's history")
            return version

        return lake._commit(commit)
    except BaseException:
        # Once the commit is in the log its files are table data: never delete them, even
        # if something failed after it landed.
        try:
            landed = commit_version(lake.delta(name), write_id) is not None
        except Exception:  # the log cannot tell: keep the files (an orphan costs disk only)
            landed = True
        if not landed:
            for f in moved:
                f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (root / STAGING_DIR).rmdir()
        except OSError:
            pass


def _overwrite_filters(
    cols: list[str], wanted: set[tuple[tuple[str, str | None], ...]] | None
) -> tuple[list[tuple[str, str, Any]] | None, bool]:
    """delta-rs partition filters selecting exactly `wanted`, or (None, True) when a flat
    conjunction cannot express them (several multi-column partitions): then the commit
    removes those partitions' files explicitly."""
    if wanted is None:
        return None, False
    if len(cols) == 1:
        values = sorted("" if v is None else v for ((_, v),) in wanted)
        return [(cols[0], "in", values)], False
    if len(wanted) == 1:
        (key,) = wanted
        return [(k, "=", "" if v is None else v) for k, v in key], False
    return None, True


def _remove_actions(dt: Any, cols: list[str],
                    wanted: set[tuple[tuple[str, str | None], ...]]) -> list[RemoveAction]:
    actions = pa.table(dt.get_add_actions(flatten=True))
    now = int(time.time() * 1000)
    out = []
    for i, path in enumerate(actions.column("path").to_pylist()):
        pv = {c: actions.column(f"partition.{c}")[i].as_py() for c in cols}
        key = tuple(sorted((c, None if v is None else partition_str(v)) for c, v in pv.items()))
        if key in wanted:
            out.append(RemoveAction(
                path=path, data_change=True, deletion_timestamp=now,
                size=actions.column("size_bytes")[i].as_py(),
                partition_values={c: None if v is None else partition_str(v)
                                  for c, v in pv.items()},
            ))
    return out


def _stage_actions(
    s: TableSpec,
    staging: Path,
    root: Path,
    cols: list[str],
    wanted: set[tuple[tuple[str, str | None], ...]] | None,
    moved: list[Path],
) -> list[AddAction]:
    """Check the staged files, move them into place and describe them as AddActions."""
    data_cols = [f.name for f in s.schema if f.name not in cols]
    required = [f.name for f in s.schema if not f.nullable and f.name in data_cols
                and not pa.types.is_nested(f.type)]
    staged = []
    for f in _written_files(staging):
        rel = f.relative_to(staging)
        pv = _parse_dirs(rel, cols) if cols else {}
        n, stats = file_stats(str(f), data_cols)
        if n == 0:
            continue
        for c in cols:
            if pv[c] is None and not s.schema.field(c).nullable:
                raise LakeError(f"{s.name}.{c}: null value(s) in a required partition column")
        for c in required:
            if stats["nullCount"].get(c, 0):
                raise LakeError(f"{s.name}.{c}: {stats['nullCount'][c]} null value(s) in a "
                                f"required column")
        if wanted is not None:
            key = tuple(sorted(pv.items()))
            if key not in wanted:
                raise LakeError(f"{s.name}: rows fall outside the partitions being "
                                f"overwritten: {dict(key)}")
        staged.append((f, rel, pv, stats))
    actions = []
    for f, rel, pv, stats in staged:
        target_rel = rel
        target = root / target_rel
        if target.exists():
            target_rel = rel.with_name(f"{uuid.uuid4().hex[:8]}-{rel.name}")
            target = root / target_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)
        moved.append(target)
        st = target.stat()
        actions.append(AddAction(
            path=target_rel.as_posix(),  # delta-rs URI-encodes it in the log
            size=st.st_size,
            partition_values=dict(pv),
            modification_time=int(st.st_mtime * 1000),
            data_change=True,
            stats=json.dumps(stats, separators=(",", ":")),
        ))
    return actions
