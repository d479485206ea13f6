"""What a range of Delta commits changed, read from the table's own transaction log.

A Delta table's log holds one JSON file per commit (`_delta_log/<version, 20 digits>.json`,
one action per line; Delta protocol "Delta Log Entries"). The `add` and `remove` actions
of a commit name the files it changed and their partition values; `dataChange: false`
marks a rewrite that leaves the rows as they were (e.g. delta-rs `optimize.compact`).
So the partitions whose rows changed between two versions are known without reading any
data — what incremental compaction needs. Change Data Feed would say the same per row, but
only for tables created with it enabled; the log works for every table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_DIR = "_delta_log"


def commit_file(table_path: Path, version: int) -> Path:
    return table_path / LOG_DIR / f"{version:020d}.json"


def commit_actions(text: str) -> list[dict[str, Any]]:
    """The actions of one commit file's text, one JSON object per line.

    Lines end with "\n" only: `str.splitlines` would also split inside a JSON string at
    U+2028, U+0085 and the like, which the log keeps unescaped (a title, a user id)."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def changed_partition_values(table_path: Path | str, after: int, upto: int,
                             column: str) -> set[str | None] | None:
    """Values of partition column `column` whose rows commits `after + 1 .. upto` changed.

    Returns None when the log cannot tell: a commit file is gone (log clean-up after a
    checkpoint) or a data-changing action lacks its partition values. The caller then
    has to treat every partition as changed.
    """
    path = Path(table_path)
    out: set[str | None] = set()
    for version in range(after + 1, upto + 1):
        try:
            text = commit_file(path, version).read_text()
        except FileNotFoundError:
            return None
        for action in commit_actions(text):
            for kind in ("add", "remove"):
                change = action.get(kind)
                if change is None or change.get("dataChange") is False:
                    continue
                values = change.get("partitionValues")
                if values is None or column not in values:
                    return None
                out.add(values[column])
    return out
