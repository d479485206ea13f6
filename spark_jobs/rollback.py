"""Roll the served model back: point CURRENT at an earlier, valid, non-rejected version.

The target must be a complete bundle (manifest readable, checksums intact) and must not
have been rejected by the gate. `model_runs` is updated: the target becomes `current`,
the version moved away from becomes `rolled_back`. Online servers pick the change up on
their next reload (ReloadModel or CURRENT polling).

    python -m spark_jobs.rollback --version v20261121T010000Z-9f3c
    python -m spark_jobs.rollback            # the newest accepted version before CURRENT
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lake.bundle import (
    BundleError,
    current_version,
    list_versions,
    read_manifest,
    set_current,
    verify_checksums,
)
from lake.config import Settings
from lake.tables import Lake
from spark_jobs.cli import JobError, job_parser, run_main, settings_from_args
from spark_jobs.publish import (
    CURRENT,
    PUBLISHED,
    REJECTED,
    ROLLED_BACK,
    model_run,
    set_status,
)


def _runs(lake: Lake) -> dict[str, dict[str, Any]]:
    if not lake.exists("model_runs"):
        return {}
    return {r["model_version"]: r for r in lake.read("model_runs").to_pylist()}


def previous_version(models_dir: Path, lake: Lake) -> str | None:
    """The newest accepted (not rejected, not rolled back) bundle older than CURRENT."""
    cur = current_version(models_dir)
    runs = _runs(lake)
    candidates = [
        v for v in list_versions(models_dir)
        if (cur is None or v < cur) and runs.get(v, {}).get("status") == PUBLISHED
    ]
    return candidates[-1] if candidates else None


def run(settings: Settings, *, version: str | None = None) -> dict[str, Any]:
    """Make `version` (default: `previous_version`) current.

    Raises:
        JobError: unknown version, a rejected one, or an invalid bundle.

    Returns:
        `{"job", "version", "previous_current", "seconds"}`.
    """
    t0 = time.perf_counter()
    models_dir = Path(settings.model.dir)
    lake = Lake.from_settings(settings.lake)
    known = list_versions(models_dir)
    if version is None:
        version = previous_version(models_dir, lake)
        if version is None:
            raise JobError(f"no earlier published version to roll back to in {models_dir}")
    if version not in known:
        raise JobError(
            f"unknown model version {version!r}; bundles in {models_dir}: {known or 'none'}"
        )
    run_row = model_run(lake, version)
    if run_row is not None and run_row["status"] == REJECTED:
        raise JobError(f"version {version} was rejected by the gate ({run_row['gate_reason']}); "
                       "publish it with --force to serve it anyway")
    try:
        verify_checksums(models_dir / version, read_manifest(models_dir / version))
    except BundleError as exc:
        raise JobError(f"cannot roll back to {version}: {exc}") from exc

    previous = current_version(models_dir)
    set_current(models_dir, version)
    if previous is not None and previous != version:
        set_status(lake, [previous], ROLLED_BACK)
    # any other run still marked current (e.g. after a manual CURRENT edit) is demoted
    stale = [v for v, r in _runs(lake).items() if r["status"] == CURRENT and v != version]
    set_status(lake, stale, PUBLISHED)
    set_status(lake, [version], CURRENT)
    return {
        "job": "rollback",
        "version": version,
        "previous_current": previous,
        "current": current_version(models_dir),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.rollback", "Point CURRENT at an earlier model version.")
    parser.add_argument("--version", default=None,
                        help="version to serve (default: newest published version before CURRENT)")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), version=args.version)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
