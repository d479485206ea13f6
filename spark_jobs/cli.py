"""Shared command-line plumbing for the batch jobs: arguments, dates, settings, JSON output.

Every job's `main(argv)` is a thin wrapper: build a parser with `job_parser`, parse,
`settings_from_args`, call the job's `run(...)`, and print its result with `emit` (one
JSON line on stdout, which is what scripts read; `--result-file` writes the same line to a
file too, which is where the Airflow tasks read it). Errors a user can fix (bad dates,
unknown versions, invalid config) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from lake.bundle import BundleError
from lake.config import ConfigError, Settings, load_settings
from lake.tables import LakeError
from spark_jobs.staging import StagingError

EXIT_USAGE = 2


class JobError(ValueError):
    """A job was asked for something it cannot do (unknown version, empty input, ...)."""


USER_ERRORS: tuple[type[Exception], ...] = (JobError, LakeError, BundleError, StagingError)


def parse_date(value: str) -> date:
    """`YYYY-MM-DD` (or an ISO timestamp, of which the date is kept) -> date."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid date {value!r}; expected YYYY-MM-DD"
        ) from None


def date_range(start: date, end: date) -> list[date]:
    """Every date from `start` to `end`, both included."""
    if end < start:
        raise JobError(f"end date {end} is before start date {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options every job shares (`--config`, `--master`,
    `--result-file`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML settings file (default: $LAMBDAREC_CONFIG or infra/lambdarec.yaml)",
    )
    p.add_argument(
        "--master",
        default=None,
        help="Spark master URL overriding spark.master, e.g. spark://127.0.0.1:7077",
    )
    p.add_argument(
        "--result-file",
        dest="result_file",
        type=Path,
        default=None,
        help="also write the JSON result line to this file (the DAGs' Spark tasks read it)",
    )
    return p


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Load settings from `--config` (+ environment), applying `--master` and `overrides`.

    `overrides` is a nested dict of sections, e.g. `train={"backend": "mllib"}`.
    """
    tree: dict[str, Any] = {k: v for k, v in overrides.items() if v}
    master = getattr(args, "master", None)
    if master:
        tree.setdefault("spark", {})["master"] = master
    return load_settings(getattr(args, "config", None), overrides=tree or None)


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, date | datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def emit(result: dict[str, Any], result_file: Path | None = None) -> None:
    """Print `result` as one JSON line on stdout (and write it to `result_file` if given)."""
    line = json.dumps(result, default=to_jsonable, sort_keys=True) + "\n"
    if result_file is not None:
        result_file.write_text(line)
    sys.stdout.write(line)
    sys.stdout.flush()


def run_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], dict[str, Any]],
) -> int:
    """Parse `argv`, run `body(args)`, print its result; user errors exit 2 with one line.

    `ConfigError`, `JobError`, `LakeError`, `BundleError` and `StagingError` are problems
    the caller can fix: they are reported without a traceback. Anything else propagates,
    so a real failure keeps its traceback in the task log.
    """
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result = body(args)
    except ConfigError as exc:
        sys.stderr.write(f"{parser.prog}: config error: {exc}\n")
        return EXIT_USAGE
    except USER_ERRORS as exc:
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    emit(result, getattr(args, "result_file", None))
    return 0 if result.get("ok", True) else 1
