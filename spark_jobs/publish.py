"""Publish a staged model: gate it, write its bundle and factor tables, record it, go live.

Steps for version V (each safe to repeat):

1. Load the staged model and its metrics (`spark_jobs.staging`).
2. Gate (`spark_jobs.gate.decide`): the ALS metric against the popularity baseline and the
   model currently served. A version that already has a `model_runs` row keeps its
   recorded decision unless `--force` is given, so a retried task never flips a decision
   nor rolls CURRENT back to a superseded version.
3. Bundle `<models_dir>/V/` (`lake.bundle.write_bundle`, FAISS index, metrics in the
   manifest); an existing bundle of V is reused.
4. `user_factors` / `item_factors`: partition `model_version = V` rewritten from Arrow.
5. `model_runs` row for V upserted: status `current` (accepted) or `rejected`, gate
   reason, params, metrics JSON, bundle path; `created_at` of a rerun is the first one's.
6. If accepted: CURRENT -> V, and the previously current run's status becomes `published`.

Rejected versions keep their bundle and row but are never made current.

    python -m spark_jobs.publish --version v20261122T010000Z-ab12 [--force]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lake.bundle import (
    current_version,
    read_manifest,
    recipe_manifest,
    set_current,
    write_bundle,
)
from lake.config import Settings
from lake.tables import Lake
from lake.training_cut import RECEIVED_UNTIL, TS_BEFORE
from spark_jobs.cli import JobError, job_parser, run_main, settings_from_args
from spark_jobs.gate import Decision, decide
from spark_jobs.staging import TrainedModel, load_metrics, load_staged

# model_runs.status values
CURRENT = "current"
PUBLISHED = "published"
REJECTED = "rejected"
ROLLED_BACK = "rolled_back"
MODEL_KEY = "als"


def factor_table(ids: np.ndarray, factors: np.ndarray, version: str, id_col: str) -> pa.Table:
    """Arrow table `id_col, factors (list<float32>), model_version` for a factor Delta table."""
    f = np.ascontiguousarray(factors, dtype=np.float32)
    n, k = f.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32), type=pa.int32())
    values = pa.array(f.reshape(-1), type=pa.float32())
    lists = pa.ListArray.from_arrays(
        offsets, values, type=pa.list_(pa.field("element", pa.float32(), False))
    )
    return pa.table(
        {
            id_col: pa.array(np.asarray(ids).astype(str).tolist(), type=pa.string()),
            "factors": lists,
            "model_version": pa.array([version] * n, type=pa.string()),
        }
    )


def model_run(lake: Lake, version: str) -> dict[str, Any] | None:
    """The `model_runs` row of `version`, or None."""
    if not lake.exists("model_runs"):
        return None
    rows = lake.read("model_runs", filters=[("model_version", "=", version)]).to_pylist()
    return rows[0] if rows else None


def set_status(lake: Lake, versions: list[str], status: str) -> None:
    """Set `model_runs.status` of `versions` (rewrites those rows through a keyed upsert)."""
    if not versions:
        return
    rows = lake.read("model_runs").to_pylist()
    changed = [dict(r, status=status) for r in rows
               if r["model_version"] in versions and r["status"] != status]
    if changed:
        lake.upsert("model_runs", pa.Table.from_pylist(changed))


def _current_metrics(
    models_dir: Path, current: str | None, version: str, metrics: dict[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """Metrics of the served model to compare with, and where they come from."""
    if current is None or current == version:
        return None, "none"
    evaluated = metrics.get("models", {}).get("current")
    if evaluated:
        return evaluated, f"{current} evaluated on this test set"
    try:
        recorded = read_manifest(models_dir / current).get("metrics") or {}
    except ValueError:
        return None, f"{current} has no readable manifest"
    if recorded.get("split") != metrics.get("split"):
        return None, f"{current} was evaluated on a different split ({recorded.get('split')})"
    als = recorded.get("models", {}).get(MODEL_KEY)
    if not als:
        return None, f"{current} has no recorded metrics"
    return als, f"{current} as recorded at its own evaluation"


GATE_SECTION = "## Gate decision"


def record_decision(report: str | None, decision: Decision, status: str) -> None:
    """Write the gate's decision at the end of the evaluation report (replacing an earlier
    one), so the report says whether the model went live and why."""
    if not report or not Path(report).exists():
        return
    path = Path(report)
    text = path.read_text().split(f"\n{GATE_SECTION}\n")[0].rstrip("\n")
    verdict = "ACCEPTED" if decision.accepted else "REJECTED"
    path.write_text(f"{text}\n\n{GATE_SECTION}\n\n**{verdict}** (status `{status}`): "
                    f"{decision.reason}\n")


def _ensure_bundle(
    settings: Settings, model: TrainedModel, metrics: dict[str, Any]
) -> tuple[Path, bool]:
    """Write the bundle of `model` unless a valid one exists; returns (path, reused)."""
    from lake.vector_index import build_and_save

    path = settings.model.dir / model.version
    if path.exists():
        manifest = read_manifest(path)
        if manifest.get("version") != model.version:
            raise JobError(f"{path} holds version {manifest.get('version')!r}, "
                           f"not {model.version!r}")
        return path, True
    path = write_bundle(
        settings.model.dir,
        model.version,
        user_ids=model.user_ids,
        item_ids=model.item_ids,
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        user_items=model.user_items,
        item_popularity=model.item_popularity,
        foldin=model.foldin,
        backend=model.backend,
        params=model.params,
        metrics=metrics,
        write_index=lambda f, p: build_and_save(f, p, settings.index),
        extra={"as_of": model.as_of.isoformat() if model.as_of else None,
               **recipe_manifest(model.params),
               **{k: model.info[k] for k in (TS_BEFORE, RECEIVED_UNTIL) if k in model.info}},
    )
    return path, False


def run(settings: Settings, *, version: str, force: bool = False) -> dict[str, Any]:
    """Gate and publish staged model `version` (see the module docstring).

    Returns:
        `{"job", "version", "accepted", "status", "reason", "current", "previous_current",
        "bundle", "bundle_reused", "metric", "metrics", "compared_with", "seconds"}`.
    """
    t0 = time.perf_counter()
    models_dir = Path(settings.model.dir)
    lake = Lake.from_settings(settings.lake)
    model = load_staged(models_dir, version)
    metrics = load_metrics(models_dir, version)
    models = metrics.get("models") or {}
    if MODEL_KEY not in models:
        raise JobError(f"metrics of {version} have no {MODEL_KEY!r} entry: {sorted(models)}")

    previous = current_version(models_dir)
    existing = model_run(lake, version)
    compared = "recorded decision"
    if existing is not None and not force and existing["status"] in (CURRENT, PUBLISHED,
                                                                     REJECTED, ROLLED_BACK):
        decision = Decision(existing["status"] != REJECTED, existing["gate_reason"] or "")
        status = existing["status"]
    else:
        cur_metrics, compared = _current_metrics(models_dir, previous, version, metrics)
        decision = decide(models[MODEL_KEY], models.get("popularity"), cur_metrics,
                          settings.gate, force=force, evidence=metrics)
        status = CURRENT if decision.accepted else REJECTED

    bundle, reused = _ensure_bundle(settings, model, metrics)
    record_decision(metrics.get("report"), decision, status)
    part = [{"model_version": version}]
    lake.overwrite("user_factors", factor_table(model.user_ids, model.user_factors, version,
                                                "user_id"), partitions=part)
    lake.overwrite("item_factors", factor_table(model.item_ids, model.item_factors, version,
                                                "item_id"), partitions=part)
    created = existing["created_at"] if existing is not None else datetime.now(UTC)
    row = {
        "model_version": [version],
        "created_at": [created],
        "as_of": [model.as_of],
        "backend": [model.backend],
        "params": [json.dumps({**model.params, "foldin": model.foldin.to_dict()},
                              sort_keys=True, default=str)],
        "metrics": [json.dumps(metrics, sort_keys=True, default=str)],
        "status": [status],
        "gate_reason": [decision.reason],
        "bundle_path": [str(bundle)],
    }
    lake.upsert("model_runs", pa.table(row))
    if status == CURRENT:
        set_current(models_dir, version)
        others = [r["model_version"] for r in lake.read("model_runs").to_pylist()
                  if r["status"] == CURRENT and r["model_version"] != version]
        set_status(lake, others, PUBLISHED)
    return {
        "job": "publish",
        "version": version,
        "accepted": decision.accepted,
        "status": status,
        "reason": decision.reason,
        "compared_with": compared,
        "current": current_version(models_dir),
        "previous_current": previous,
        "bundle": str(bundle),
        "bundle_reused": reused,
        "metric": settings.gate.metric,
        "metrics": {name: m.get(settings.gate.metric) for name, m in models.items()
                    if isinstance(m, dict)},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.publish",
                        "Gate a staged model and publish it (bundle, factor tables, CURRENT).")
    parser.add_argument("--version", required=True, help="staged model version to publish")
    parser.add_argument("--force", action="store_true",
                        help="publish and make current even if the gate rejects it")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), version=args.version, force=args.force)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
