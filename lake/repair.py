"""Repair of a lake whose tables are not in their catalog schema: `python -m lake.repair`.

For every existing table (or those named) it adds the catalog columns the table lacks
(schema evolution, e.g. bronze's `tenant`) and swaps every data file stored in other Arrow
types than declared for a copy in the declared types (`lake.declared_types` explains why
such files exist, delta-rs #4579, and how the swap commits). `Lake` does the swap itself
after each of its deletes, merges and optimizes; this command brings a lake written before
that (or by another tool) into line. The erasure purge (`python -m lake.erasure`) also runs
it before it drops old files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from lake.config import load_settings
from lake.declared_types import rewrite_mistyped
from lake.schemas import TABLES
from lake.tables import Lake, spec


def missing_columns(lake: Lake, name: str) -> list[str]:
    """Catalog columns the table's Delta schema lacks (added by its next write)."""
    if not lake.exists(name):
        return []
    have = {f.name for f in lake.delta(name).schema().fields}
    return [f.name for f in spec(name).schema if f.name not in have]


def repair(lake: Lake, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Bring every existing table (or those named) to its catalog schema: add the columns
    it lacks, swap its mistyped files. Returns what was done per table."""
    out: dict[str, dict[str, Any]] = {}
    for name in names if names is not None else TABLES:
        if not lake.exists(name):
            continue
        added = missing_columns(lake, name)
        if added:
            lake.ensure(name)  # evolves the schema
        out[name] = {"columns_added": added, "files_rewritten": rewrite_mistyped(lake, spec(name))}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lake.repair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="*", metavar="TABLE",
                   help=f"tables to repair (default: all of {', '.join(TABLES)})")
    args = p.parse_args(argv)
    unknown = [n for n in args.tables if n not in TABLES]
    if unknown:
        p.error(f"unknown table {unknown[0]!r}; tables: {', '.join(TABLES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lake = Lake.from_settings(load_settings().lake)
    print(json.dumps(repair(lake, args.tables or None), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
