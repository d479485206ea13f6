"""SQL over the lake from the command line (DataFusion through delta-rs' QueryBuilder).

Every existing lake table is registered under its catalog name:

    python -m lake.sql "SELECT event_type, count(*) AS n FROM bronze_events GROUP BY 1"
    python -m lake.sql --format json "SELECT * FROM items LIMIT 5"
    python -m lake.sql --version 3 "SELECT count(*) FROM bronze_events"   # one table queried
    python -m lake.sql --version bronze_events=3 --version items=1 "SELECT ... JOIN ..."
    python -m lake.sql --tables                  # version, rows, files per table
    python -m lake.sql --history bronze_events   # commit history

`--version` time-travels: `TABLE=N` pins one table (N a version number or an ISO-8601
timestamp); a bare `N` pins the single table the query references. Errors (bad SQL,
unknown table, missing version) print one line on stderr and exit with status 2.
The lake root is `--lake PATH`, else `lake.root` from the settings (`load_settings()`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

from lake.schemas import TABLES
from lake.tables import Lake, LakeError

EXIT_USAGE = 2


class SqlCliError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def referenced_tables(sql: str, names: Sequence[str] = tuple(TABLES)) -> list[str]:
    """Catalog tables whose names appear as whole words in `sql` (quotes ignored)."""
    text = sql.lower()
    return [n for n in names if re.search(rf'(?<![\w.]){re.escape(n)}(?!\w)', text)]


def parse_versions(specs: Sequence[str], sql: str | None) -> dict[str, int | str]:
    """`["3"]` or `["bronze_events=3", "items=2024-01-01T00:00:00Z"]` -> {table: version}."""
    out: dict[str, int | str] = {}
    for raw in specs:
        table, sep, value = raw.partition("=")
        if not sep:
            table, value = "", raw
        value = value.strip()
        if not value:
            raise SqlCliError(f"--version {raw!r}: expected N or TABLE=N")
        version: int | str = int(value) if value.isdigit() else value
        if not table:
            refs = referenced_tables(sql or "")
            if len(refs) != 1:
                raise SqlCliError(
                    f"--version {raw}: the query references {len(refs)} tables {refs}; "
                    "use --version TABLE=N"
                )
            table = refs[0]
        if table not in TABLES:
            raise SqlCliError(f"--version {raw}: unknown table {table!r}; tables: {sorted(TABLES)}")
        out[table] = version
    return out


def run_query(lake: Lake, sql: str, versions: dict[str, int | str] | None = None) -> pa.Table:
    """Run `sql` with every existing table registered; `versions` pins tables to versions."""
    from deltalake import QueryBuilder

    versions = versions or {}
    qb = QueryBuilder()
    for name in TABLES:
        if name in versions:
            qb.register(name, lake.delta(name, versions[name]))
        elif lake.exists(name):
            qb.register(name, lake.delta(name))
    missing = [n for n in referenced_tables(sql) if n not in versions and not lake.exists(n)]
    try:
        return pa.table(qb.execute(sql).read_all())
    except Exception as exc:  # DataFusion reports bad SQL / unknown tables as generic errors
        msg = _one_line(str(exc))
        if "not found" in msg:
            if missing:
                msg = f"table(s) {missing} have no data yet in {lake.root} ({msg})"
            else:
                msg += f"; tables: {sorted(TABLES)}"
        raise SqlCliError(msg) from exc


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return " | ".join(lines) if lines else "query failed"


# -- rendering ---------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | dict):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def render(table: pa.Table, fmt: str = "table", *, max_width: int | None = None) -> str:
    """Render an Arrow table as an aligned text table, a JSON array of objects, or CSV.

    `max_width` shortens long cells of the text table (never JSON or CSV).
    """
    rows = table.to_pylist()
    cols = table.column_names
    if fmt == "json":
        return json.dumps([{k: _json_value(r[k]) for k in cols} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else _cell(r[c]) for c in cols])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    if max_width:
        cells = [[v if len(v) <= max_width else v[: max_width - 3] + "..." for v in row]
                 for row in cells]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    numeric = [
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        for t in table.schema.types
    ]

    def line(values: Sequence[str]) -> str:
        return " | ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(cols), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def tables_table(lake: Lake) -> pa.Table:
    rows = lake.summary()
    return pa.table({
        "table": [r["table"] for r in rows],
        "version": pa.array([r["version"] for r in rows], pa.int64()),
        "rows": pa.array([r["rows"] for r in rows], pa.int64()),
        "files": pa.array([r["files"] for r in rows], pa.int64()),
        "partitioned_by": [r["partitioned_by"] for r in rows],
    })


def history_table(lake: Lake, name: str, limit: int | None = None) -> pa.Table:
    if name not in TABLES:
        raise SqlCliError(f"unknown table {name!r}; tables: {sorted(TABLES)}")
    if not lake.exists(name):
        raise SqlCliError(f"table {name!r} does not exist in {lake.root}")
    hist = lake.delta(name).history(limit)
    ts = [h.get("timestamp") for h in hist]
    return pa.table({
        "version": pa.array([h.get("version") for h in hist], pa.int64()),
        "timestamp": pa.array(
            [None if t is None else datetime.fromtimestamp(t / 1000, UTC) for t in ts],
            pa.timestamp("ms", tz="UTC"),
        ),
        "operation": [h.get("operation") for h in hist],
        "parameters": [
            json.dumps({k: v for k, v in (h.get("operationParameters") or {}).items()
                        if k not in ("metadata", "protocol")},
                       separators=(",", ":"), sort_keys=True)
            for h in hist
        ],
        "metrics": [
            json.dumps(h.get("operationMetrics") or {}, separators=(",", ":"), sort_keys=True)
            for h in hist
        ],
    })


# -- entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lake.sql",
        description="Run SQL over the lake's Delta tables (DataFusion via delta-rs).",
    )
    p.add_argument("sql", nargs="?", help="the query; tables are named as in the catalog")
    p.add_argument("--lake", type=Path, help="lake root (default: lake.root from settings)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--version", action="append", default=[], metavar="[TABLE=]N",
                   help="time travel: TABLE=N (repeatable) or N for the one table queried; "
                        "N is a version number or an ISO-8601 timestamp")
    p.add_argument("--tables", action="store_true", help="list tables: version, rows, files")
    p.add_argument("--history", metavar="TABLE", help="show a table's commit history")
    p.add_argument("--limit", type=int, default=None, help="with --history: newest N commits")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = sum([bool(args.sql), args.tables, args.history is not None])
        if modes != 1:
            raise SqlCliError("give exactly one of: a SQL query, --tables, --history TABLE")
        if args.lake is not None:
            lake = Lake(args.lake)
        else:
            from lake.config import load_settings

            lake = Lake.from_settings(load_settings().lake)
        if args.tables:
            result = tables_table(lake)
        elif args.history is not None:
            result = history_table(lake, args.history, args.limit)
        else:
            result = run_query(lake, args.sql, parse_versions(args.version, args.sql))
        print(render(result, args.format, max_width=100 if args.history else None))
    except (SqlCliError, LakeError, ValueError) as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
