"""Bulk-load sample data (synthetic or MovieLens) into bronze_events and items.

`ensure_sample_data(settings)` loads the configured source (``settings.data.source``) when
``bronze_events`` is empty, and does nothing otherwise, so it is safe to call on every start.
With ``force=True`` it *replaces* the sample data: every event a bulk load wrote before
(recognised by its deterministic id: ``syn<seed>-e<n>``, ``ml100k-<u>-<m>``,
``ml1m-<u>-<m>``, from any source) is deleted first, then the source is loaded again, so
nothing is duplicated; events ingested online (other ids) are kept. The item catalogue is
upserted by ``item_id`` (idempotent by nature); items of a previous source stay.

Events are appended in commits of up to `COMMIT_ROWS` rows (one Delta version each), not one
commit per generated chunk. Two loaders racing on the same lake are serialised by a lock
file in the lake root, so they cannot both see an empty table and load twice.

CLI (prints one JSON line describing what was done)::

    python -m lake.load [--source synthetic|ml-100k|ml-1m] [--events N --users N --items N
                        --seed S --days D --end YYYY-MM-DD] [--data-dir PATH] [--lake PATH]
                        [--config PATH] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from lake import movielens, synthetic
from lake.config import ConfigError, Settings, load_settings
from lake.tables import Lake

COMMIT_ROWS = 1_000_000
"""Events per bronze commit during a bulk load."""
DEFAULT_DAYS = 30
"""Days of synthetic history (`settings.data` has no such key yet)."""
SAMPLE_EVENT_ID_REGEX = r"^(syn[0-9]+-e|ml100k-[0-9]+-|ml1m-[0-9]+-)[0-9]+$"
"""Matches exactly the event ids that `lake.synthetic` and `lake.movielens` produce."""
LOCK_FILE = ".sample_data.lock"


@contextmanager
def _lake_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def source_tables(
    settings: Settings, *, days: int = DEFAULT_DAYS, end: date | None = None
) -> tuple[Iterator[pa.Table], pa.Table]:
    """The configured source as (stream of bronze event tables, item catalogue)."""
    d = settings.data
    if d.source == "synthetic":
        start, _ = synthetic.window(days, end)
        events = synthetic.generate(d.synthetic_events, d.synthetic_users, d.synthetic_items,
                                    d.seed, days, end)
        return events, synthetic.catalogue(d.synthetic_items, d.seed, updated_at=start)
    items = movielens.items(d.source, d.dir)  # raises MovieLensDataMissing first
    return movielens.events(d.source, d.dir), items


def _rebatch(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Group a stream of tables into tables of `rows` rows (the last one may be smaller)."""
    buf: list[pa.Table] = []
    n = 0
    for t in tables:
        while t.num_rows:
            part = t.slice(0, rows - n)
            t = t.slice(part.num_rows)
            buf.append(part)
            n += part.num_rows
            if n == rows:
                yield pa.concat_tables(buf)
                buf, n = [], 0
    if n:
        yield pa.concat_tables(buf)


def ensure_sample_data(
    settings: Settings,
    *,
    force: bool = False,
    days: int = DEFAULT_DAYS,
    end: date | None = None,
    commit_rows: int = COMMIT_ROWS,
) -> dict[str, Any]:
    """Load `settings.data.source` into bronze_events + items if bronze is empty (or `force`).

    Args:
        settings: the lake root and data source (`settings.lake`, `settings.data`).
        force: replace previously bulk-loaded events instead of skipping a non-empty table.
        days: synthetic only: days of history, ending at `end`.
        end: synthetic only: last day with events; default yesterday (UTC).
        commit_rows: events per Delta commit.

    Returns:
        What was done: ``source``, ``loaded`` (bool), ``events`` and ``items`` written,
        ``deleted_events``, ``commits``, ``bronze_events`` (rows after the call),
        ``seconds``, and ``reason`` when nothing was loaded.

    Raises:
        movielens.MovieLensDataMissing: the MovieLens files are not where configured.
    """
    if commit_rows < 1:
        raise ValueError(f"commit_rows must be >= 1, got {commit_rows}")
    lake = Lake.from_settings(settings.lake)
    source = settings.data.source
    t0 = time.perf_counter()
    with _lake_lock(lake.root):
        existing = lake.count("bronze_events")
        if source == "none":
            return {"source": source, "loaded": False, "events": 0, "items": 0,
                    "deleted_events": 0, "commits": 0, "bronze_events": existing,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "reason": "data.source is none: the lake is filled through the API"}
        if existing and not force:
            return {"source": source, "loaded": False, "events": 0, "items": 0,
                    "deleted_events": 0, "commits": 0, "bronze_events": existing,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "reason": f"bronze_events already holds {existing} events (use --force)"}
        events, items = source_tables(settings, days=days, end=end)
        deleted = 0
        if existing:
            metrics = lake.delete("bronze_events",
                                  f"regexp_like(event_id, '{SAMPLE_EVENT_ID_REGEX}')")
            deleted = int(metrics.get("num_deleted_rows", 0) or 0)
        lake.upsert("items", items)
        written = commits = 0
        for batch in _rebatch(events, commit_rows):
            lake.append("bronze_events", batch)
            written += batch.num_rows
            commits += 1
        seconds = time.perf_counter() - t0
        return {"source": source, "loaded": True, "events": written, "items": items.num_rows,
                "deleted_events": deleted, "commits": commits,
                "bronze_events": lake.count("bronze_events"), "seconds": round(seconds, 3)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lake.load",
        description="Load sample data into the lake (bronze_events + items) if it is empty.",
    )
    p.add_argument("--source", choices=["synthetic", "ml-100k", "ml-1m"],
                   help="data source (default: data.source from the config)")
    p.add_argument("--events", type=int, help="synthetic: number of events")
    p.add_argument("--users", type=int, help="synthetic: number of users")
    p.add_argument("--items", type=int, help="synthetic: number of items")
    p.add_argument("--seed", type=int, help="synthetic: random seed (>= 0)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS,
                   help=f"synthetic: days of history (default {DEFAULT_DAYS})")
    p.add_argument("--end", type=date.fromisoformat,
                   help="synthetic: last day with events, YYYY-MM-DD (default yesterday, UTC)")
    p.add_argument("--data-dir", type=Path, help="folder holding ml-100k/ and ml-1m/")
    p.add_argument("--lake", type=Path, help="lake root (default: lake.root from the config)")
    p.add_argument("--config", type=Path, help="YAML config (default: $LAMBDAREC_CONFIG or "
                                                "infra/lambdarec.yaml)")
    p.add_argument("--force", action="store_true",
                   help="replace previously loaded sample events even if bronze is not empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data: dict[str, Any] = {}
    for flag, key in (("source", "source"), ("events", "synthetic_events"),
                      ("users", "synthetic_users"), ("items", "synthetic_items"),
                      ("seed", "seed")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.data_dir is not None:
        data["dir"] = str(args.data_dir.resolve())
    overrides: dict[str, Any] = {"data": data}
    if args.lake is not None:
        overrides["lake"] = {"root": str(args.lake.resolve())}
    try:
        settings = load_settings(args.config, overrides=overrides)
        result = ensure_sample_data(settings, force=args.force, days=args.days, end=args.end)
    except (ConfigError, ValueError, movielens.MovieLensDataMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["lake"] = str(settings.lake.root)
    result["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
