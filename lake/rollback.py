"""Roll the served model back: point CURRENT at an earlier, valid, non-rejected version.

The target must be a complete bundle (manifest readable, checksums intact) and must not
have been rejected by the gate. `model_runs` is updated: the target becomes `current`,
the version moved away from becomes `rolled_back`. Online servers pick the change up on
their next reload (ReloadModel or CURRENT polling). Used by the `lambdarec_rollback` DAG
and the console; no Spark involved.

    python -m lake.rollback --version v20261121T010000Z-9f3c
    python -m lake.rollback            # the newest accepted version before CURRENT
"""

from __future__ import annotations

import argparse
import json
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
from lake.config import ConfigError, Settings, load_settings
from lake.model_runs import (
    CURRENT,
    PUBLISHED,
    REJECTED,
    ROLLED_BACK,
    model_run,
    model_runs,
    set_status,
)
from lake.tables import Lake, LakeError

EXIT_USAGE = 2


class RollbackError(ValueError):
    """No version to roll back to, or one that must not be served (unknown, rejected,
    an invalid bundle); the message says which."""


def previous_version(models_dir: Path, lake: Lake) -> str | None:
    """The newest accepted (not rejected, not rolled back) bundle older than CURRENT."""
    cur = current_version(models_dir)
    runs = model_runs(lake)
    candidates = [
        v for v in list_versions(models_dir)
        if (cur is None or v < cur) and runs.get(v, {}).get("status") == PUBLISHED
    ]
    return candidates[-1] if candidates else None


def run(settings: Settings, *, version: str | None = None,
        previous_status: str = ROLLED_BACK) -> dict[str, Any]:
    """Make `version` (default: `previous_version`) current.

    `previous_status`: what the version moved away from becomes in `model_runs`
    (`rolled_back`; a promotion from an experiment leaves it `published`, a version
    `python -m lake.rollback` can return to).

    Raises:
        RollbackError: unknown version, a rejected one, or an invalid bundle.

    Returns:
        `{"job", "version", "previous_current", "current", "seconds"}`.
    """
    t0 = time.perf_counter()
    models_dir = Path(settings.model.dir)
    lake = Lake.from_settings(settings.lake)
    known = list_versions(models_dir)
    if version is None:
        version = previous_version(models_dir, lake)
        if version is None:
            raise RollbackError(f"no earlier published version to roll back to in {models_dir}")
    if version not in known:
        raise RollbackError(
            f"unknown model version {version!r}; bundles in {models_dir}: {known or 'none'}"
        )
    run_row = model_run(lake, version)
    if run_row is not None and run_row["status"] == REJECTED:
        raise RollbackError(f"version {version} was rejected by the gate "
                            f"({run_row['gate_reason']}); publish it with --force to serve "
                            "it anyway")
    try:
        verify_checksums(models_dir / version, read_manifest(models_dir / version))
    except BundleError as exc:
        raise RollbackError(f"cannot roll back to {version}: {exc}") from exc

    previous = current_version(models_dir)
    set_current(models_dir, version)
    if previous is not None and previous != version:
        set_status(lake, [previous], previous_status)
    # any other run still marked current (e.g. after a manual CURRENT edit) is demoted
    stale = [v for v, r in model_runs(lake).items() if r["status"] == CURRENT and v != version]
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
    """Print the result as one JSON line; a problem the caller can fix is one line on stderr
    and exit status 2."""
    p = argparse.ArgumentParser(prog="lake.rollback",
                                description="Point CURRENT at an earlier model version.")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML settings file (default: $LAMBDAREC_CONFIG or infra/lambdarec.yaml)")
    p.add_argument("--version", default=None,
                   help="version to serve (default: newest published version before CURRENT)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        result = run(load_settings(args.config), version=args.version)
    except ConfigError as exc:
        sys.stderr.write(f"{p.prog}: config error: {exc}\n")
        return EXIT_USAGE
    except (RollbackError, LakeError, BundleError) as exc:
        sys.stderr.write(f"{p.prog}: error: {exc}\n")
        return EXIT_USAGE
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
