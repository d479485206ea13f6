"""Publish a staged model: gate it, write its bundle and factor tables, record it, go live.

Steps for version V (each safe to repeat):

1. Load the staged model (the bundle `staging/V/bundle`) and its metrics
   (`spark_jobs.staging`).
2. Gate (`spark_jobs.gate.decide`): the ALS metric against the popularity baseline and the
   model currently served. A version whose bundle already holds this staged model keeps
   its recorded `model_runs` decision unless `--force` is given, so a retried task never
   flips a decision nor rolls CURRENT back to a superseded version.
3. Bundle `<models_dir>/V/`: the staged bundle with its FAISS index and the metrics in the
   manifest (`lake.bundle.save_bundle`); an existing bundle of V holding the same model
   and metrics is reused.
4. `user_factors` / `item_factors`: partition `model_version = V` rewritten from Arrow.
5. `model_runs` row for V upserted: status `current` (accepted) or `rejected`, gate
   reason, params, metrics JSON, bundle path; `created_at` of a rerun is the first one's.
6. If accepted: CURRENT -> V, and the previously current run's status becomes `published`.

Rejected versions keep their bundle and row but are never made current.

**Into an experiment** (`into_experiment=NAME`, the nightly DAG's `publish.into_experiment`):
an accepted V is not made current. Its bundle is staged beside the champion (status
`published`, CURRENT unchanged) and experiment NAME runs it as arm `challenger` against the
champion's version (`lake.experiments.publish_challenger`, `publish.challenger_share`);
servers serve it within a second from the experiments file, no reload needed. Promote the
winner with `python -m lake.experiments promote EXP challenger`. Without a champion there
is nothing to compare: V goes live as usual.

**A rerun overwrites exactly its own version, all from one source.** The bundle, the
factor partitions and the `model_runs` row of V always come from V's staging as it is
now, so they cannot disagree. A plain retry finds the bundle holding that staging and
changes nothing. After `train` (or `evaluate`) ran again for V (a cleared Airflow task),
the staging holds another model: a V never served (no row yet, or rejected) is published
again from it (bundle replaced, gated anew); a V that has been served (`current`,
`published`, `rolled_back`) is refused with one line and nothing is written, because
servers know a model by its version, and new factors under a served name would differ
between replicas that reloaded and those that did not. Publish such a model under a new
version (a new run).

    python -m spark_jobs.publish --version v20261122T010000Z-ab12 [--force] \
        [--into-experiment NAME]
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

from lake.bundle import current_version, read_manifest, save_bundle, set_current
from lake.config import Settings
from lake.experiments import ExperimentConflict, StoreError, publish_challenger
from lake.model_runs import CURRENT, PUBLISHED, REJECTED, ROLLED_BACK, model_run, set_status
from lake.tables import Lake
from spark_jobs.cli import JobError, job_parser, run_main, settings_from_args
from spark_jobs.gate import Decision, decide
from spark_jobs.staging import load_metrics, staged_bundle

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
        recorded = read_manifest(models_dir / current).metrics
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


def run(settings: Settings, *, version: str, force: bool = False,
        into_experiment: str | None = None) -> dict[str, Any]:
    """Gate and publish staged model `version` (see the module docstring); with
    `into_experiment`, an accepted model becomes that experiment's challenger instead of
    CURRENT.

    Raises:
        JobError: the metrics lack the model, the bundle directory holds another version,
            or V has been served from another model than its staging holds now.

    Returns:
        `{"job", "version", "accepted", "status", "reason", "current", "previous_current",
        "bundle", "bundle_reused", "bundle_replaced", "metric", "metrics", "compared_with",
        "seconds"}`.
    """
    from lake.vector_index import build_and_save

    t0 = time.perf_counter()
    models_dir = Path(settings.model.dir)
    lake = Lake.from_settings(settings.lake)
    staged = staged_bundle(models_dir, version)
    metrics = load_metrics(models_dir, version)
    models = metrics.get("models") or {}
    if MODEL_KEY not in models:
        raise JobError(f"metrics of {version} have no {MODEL_KEY!r} entry: {sorted(models)}")
    model = staged.with_metrics(metrics)  # what V's bundle, tables and row are made of

    previous = current_version(models_dir)
    existing = model_run(lake, version)
    path = models_dir / version
    published = read_manifest(path) if path.exists() else None
    if published is not None and published.version != version:
        raise JobError(f"{path} holds version {published.version!r}, not {version!r}")
    same = published is not None and published.same_model(model.manifest) \
        and published.metrics == model.manifest.metrics
    if published is not None and not same and existing is not None \
            and existing["status"] in (CURRENT, PUBLISHED, ROLLED_BACK):
        raise JobError(
            f"{version} was published (status {existing['status']}) from another model than "
            f"its staging holds now (train or evaluate ran again since); a served version is "
            f"never replaced: publish the new model under a new version")
    compared = "recorded decision"
    if existing is not None and not force and (same or published is None) \
            and existing["status"] in (CURRENT, PUBLISHED, REJECTED, ROLLED_BACK):
        decision = Decision(existing["status"] != REJECTED, existing["gate_reason"] or "")
        status = existing["status"]
    else:
        cur_metrics, compared = _current_metrics(models_dir, previous, version, metrics)
        decision = decide(models[MODEL_KEY], models.get("popularity"), cur_metrics,
                          settings.gate, force=force, evidence=metrics)
        status = CURRENT if decision.accepted else REJECTED
    challenger = bool(into_experiment) and decision.accepted and previous is not None \
        and previous != version
    if challenger and status == CURRENT:
        status = PUBLISHED  # staged beside the champion: the experiment serves it

    if not same:
        save_bundle(model, path, write_index=lambda f, p: build_and_save(f, p, settings.index),
                    replace=published is not None)
    record_decision(metrics.get("report"), decision, status)
    part = [{"model_version": version}]
    lake.overwrite("user_factors", factor_table(model.user_ids, model.user_factors, version,
                                                "user_id"), partitions=part)
    lake.overwrite("item_factors", factor_table(model.item_ids, model.item_factors, version,
                                                "item_id"), partitions=part)
    manifest = model.manifest
    created = existing["created_at"] if existing is not None else datetime.now(UTC)
    row = {
        "model_version": [version],
        "created_at": [created],
        "as_of": [manifest.as_of],
        "backend": [manifest.backend],
        "params": [json.dumps({**manifest.params, "foldin": manifest.foldin.to_dict()},
                              sort_keys=True, default=str)],
        "metrics": [json.dumps(manifest.metrics, sort_keys=True, default=str)],
        "status": [status],
        "gate_reason": [decision.reason],
        "bundle_path": [str(path)],
    }
    lake.upsert("model_runs", pa.table(row))
    if status == CURRENT:
        set_current(models_dir, version)
        others = [r["model_version"] for r in lake.read("model_runs").to_pylist()
                  if r["status"] == CURRENT and r["model_version"] != version]
        set_status(lake, others, PUBLISHED)
    experiment = None
    if challenger and status == PUBLISHED:
        try:
            experiment = publish_challenger(
                settings, str(into_experiment), champion=str(previous), challenger=version,
                share=settings.publish.challenger_share,
                traffic=settings.publish.experiment_traffic).to_json()
        except (ExperimentConflict, StoreError) as exc:
            raise JobError(f"{version} is published but not in experiment "
                           f"{into_experiment!r}: {exc}") from None
    return {
        "job": "publish",
        "version": version,
        "accepted": decision.accepted,
        "status": status,
        "reason": decision.reason,
        "compared_with": compared,
        "current": current_version(models_dir),
        "previous_current": previous,
        "bundle": str(path),
        "bundle_reused": same,
        "bundle_replaced": published is not None and not same,
        "metric": settings.gate.metric,
        "metrics": {name: m.get(settings.gate.metric) for name, m in models.items()
                    if isinstance(m, dict)},
        "experiment": experiment,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.publish",
                        "Gate a staged model and publish it (bundle, factor tables, CURRENT).")
    parser.add_argument("--version", required=True, help="staged model version to publish")
    parser.add_argument("--force", action="store_true",
                        help="publish and make current even if the gate rejects it")
    parser.add_argument("--into-experiment", metavar="NAME", default=None,
                        help="run an accepted model as the challenger of experiment NAME "
                             "against the champion instead of making it current")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), version=args.version, force=args.force,
                   into_experiment=args.into_experiment)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
