"""The whole batch layer in one process: sample data -> silver -> gold -> ALS -> gate -> bundle.

Runs the same jobs the Airflow DAG runs one task at a time (compact, interactions, train,
evaluate, publish), sharing one SparkSession, and prints ONE JSON line: the model version,
the gate decision and the metrics of the model and of each baseline.

    python -m spark_jobs.pipeline                                  # synthetic sample data
    python -m spark_jobs.pipeline --data ml-1m                     # MovieLens-1M
    python -m spark_jobs.pipeline --master spark://127.0.0.1:7077  # on a standalone cluster

`--data ml-100k|ml-1m` keeps each dataset apart: unless the lake root / models dir are
configured explicitly (YAML or environment), they become `var/datasets/<name>/lake` and
`var/datasets/<name>/models`. No setting is specific to a dataset: the nightly tuning
search (`spark_jobs.tune`, on unless `tune.enabled` is false) picks strength, ALS and
blend settings for whatever data the lake holds, whether loaded here or ingested through
the API. The as-of date defaults to the last complete UTC day, or the last event date
when the data ends earlier (`lake.as_of`, the rule of the DAG's manual runs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from lake.config import PROJECT_ROOT, Settings
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MOVIELENS = ("ml-100k", "ml-1m")
DATA_SOURCES = ("synthetic", *MOVIELENS)
DEFAULT_LAKE_ROOT = PROJECT_ROOT / "var" / "lake"
DEFAULT_MODELS_DIR = PROJECT_ROOT / "var" / "models"


def dataset_settings(settings: Settings, data: str | None) -> Settings:
    """`settings` with `data.source` = `data` and, for MovieLens, its own lake and models
    (`data.source: none` keeps the configured lake: the one the API fills).

    Only paths still at their defaults are changed, so an explicit configuration wins.
    """
    if data is not None and data not in DATA_SOURCES:
        raise JobError(f"unknown data source {data!r}; expected one of {list(DATA_SOURCES)}")
    source = data or settings.data.source
    tree = settings.model_dump()
    tree["data"]["source"] = source
    # Only the public datasets get a lake of their own: `none` reads the lake the server
    # writes (your own data), `synthetic` is the default lake's sample.
    if source in MOVIELENS:
        base = PROJECT_ROOT / "var" / "datasets" / source
        if settings.lake.root == DEFAULT_LAKE_ROOT:
            tree["lake"]["root"] = base / "lake"
        if settings.model.dir == DEFAULT_MODELS_DIR:
            tree["model"]["dir"] = base / "models"
    return Settings.model_validate(tree)


FACT_KEYS = ("engine", "mode", "dates", "bronze_rows", "silver_rows", "events", "pairs", "users",
             "items", "reused", "nnz", "trials", "best", "best_metric", "n_test_users",
             "held_out_share", "baselines_cached", "accepted", "reason")


def progress(line: str) -> None:
    """One progress line on stderr (stdout carries only the final JSON line)."""
    print(f"[pipeline] {line}", file=sys.stderr, flush=True)


def step_facts(out: Any) -> str:
    """The rows in/out and decisions a step reports, for its progress line."""
    if hasattr(out, "facts"):  # e.g. the evaluation's sample
        out = out.facts
    if isinstance(out, dict):
        facts = {k: out[k] for k in FACT_KEYS if k in out}
    elif hasattr(out, "n_events"):
        facts = {"events": out.n_events}
    else:
        return ""
    return ": " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in facts.items()) if facts else ""


def data_read(loaded: dict[str, Any]) -> str:
    """What the run trained on, for its summary: the sample source it just loaded into an
    empty lake (`synthetic`, `ml-1m`, ...), else `lake` — events already there, sent through
    the API or loaded by an earlier run (`data.source: none` always reads the lake)."""
    return str(loaded["source"]) if loaded.get("loaded") else "lake"


def reload_servers(settings: Settings, version: str) -> dict[str, str]:
    """Make running servers (`airflow.reload_targets`) serve the new model; for a server
    that does not answer, say how to do it later (a server started later loads CURRENT)."""
    from lake.reload_notice import notify_reload, reload_command
    from lake.tls import own_client_tls

    targets = settings.airflow.reload_targets or []
    outcome: dict[str, str] = notify_reload(targets, settings.server.admin_token, version,
                                            timeout_s=60.0,
                                            fleet_dir=settings.fleet.run_dir,
                                            tls=own_client_tls(settings.server))["targets"]
    for target, result in outcome.items():
        if result.startswith("ok"):
            progress(f"reload: {target} now serves {version}")
        else:
            progress(f"reload: no server answered on {target} ({result}); a server started "
                     f"later loads {version}, a running one with: "
                     f"{reload_command(target, version)}")
    return outcome


def run(
    settings: Settings,
    *,
    as_of: date | None = None,
    data: str | None = None,
    backend: str | None = None,
    version: str | None = None,
    force: bool = False,
    retrain: bool = False,
    spark: SparkSession | None = None,
) -> dict[str, Any]:
    """Run every batch step once; returns the summary printed by the CLI.

    After compaction, a run whose inputs (silver version, as-of date, model settings:
    `spark_jobs.staging.inputs_fingerprint`) are those the CURRENT model was built from
    stops there: it would train, evaluate and gate the same model again. It says so and
    returns CURRENT's summary with `"unchanged": true`; `retrain` (or an explicit
    `version`) runs every step anyway.

    Args:
        settings: loaded settings (adapted with `dataset_settings` for `data`).
        as_of: as-of date; default `lake.as_of.default_as_of` (the last complete UTC day,
            or the last event date when the data ends earlier), as the DAG's manual runs.
        data: synthetic | ml-100k | ml-1m (default `settings.data.source`).
        backend: ALS backend overriding `settings.train.backend` (implicit | mllib).
        version: model version (default a new `lake.bundle.new_version(as_of)`, named
            like the DAG's).
        force: publish even if the gate rejects the model.
        retrain: train even when the inputs are the CURRENT model's.
        spark: a running session to use; otherwise a step that runs on Spark builds one
            from `settings.spark` (or uses the process's running one), and a session
            built by this run is stopped at the end.
    """
    from lake.as_of import default_as_of, event_date_bounds
    from lake.bundle import current_version, new_version
    from lake.load import ensure_sample_data
    from lake.spark_session import active_session, get_spark
    from lake.tables import Lake
    from spark_jobs import compact, evaluate, interactions, publish, train, tune
    from spark_jobs.eval_sample import version_sample
    from spark_jobs.event_log import read_event_log
    from spark_jobs.recipe import load_recipe
    from spark_jobs.staging import inputs_fingerprint, load_inputs, save_inputs

    t0 = time.perf_counter()
    settings = dataset_settings(settings, data)
    if backend is not None:
        tree = settings.model_dump()
        tree["train"]["backend"] = backend
        settings = Settings.model_validate(tree)
    steps: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        progress(f"{name} ...")
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        steps[name] = round(time.perf_counter() - t, 2)
        progress(f"{name} done in {steps[name]:.1f} s{step_facts(out)}")
        return out

    loaded = timed("data", ensure_sample_data, settings)
    bounds = event_date_bounds(Lake.from_settings(settings.lake))
    if bounds is None:
        raise JobError(f"bronze_events under {settings.lake.root} is empty after loading "
                       f"{settings.data.source!r}")
    first, last = bounds
    as_of = as_of or default_as_of(datetime.now(UTC), bounds)  # the DAG's manual-run rule
    if as_of < first:
        raise JobError(f"as-of date {as_of} is before the first event date {first}")
    start = max(first, as_of - timedelta(days=settings.interactions.lookback_days))
    version_given = version is not None
    version = version or new_version(as_of)

    # No session up front: a step that runs on Spark (`spark_jobs.engine`) starts one
    # (get_spark), and the rest of the run shares it. Only a session this run started is
    # stopped at the end, not one the caller (or anyone else in the process) runs.
    running_before = spark or active_session()
    try:
        c = timed("compact", compact.run, settings, spark=spark)  # changed dates only
        fingerprint = inputs_fingerprint(settings, c["silver_version"], as_of)
        current = current_version(settings.model.dir)
        if (not retrain and not version_given and current is not None
                and load_inputs(settings.model.dir, current) == fingerprint):
            return unchanged(settings, current, as_of, c, steps, t0)
        log = timed("read_events", read_event_log, Lake.from_settings(settings.lake),
                    start, as_of)
        test = timed("holdout", evaluate.eval_holdout, log, settings)  # for tune + evaluate
        tu = None
        if settings.tune.enabled:
            tu = timed("tune", tune.run, settings, as_of=as_of, version=version, log=log,
                       test=test)
        # the users the evaluation scores: the train step leaves their held-out pairs out
        # when they are few, and the evaluation then scores the trained item factors
        sample = timed("eval_sample", version_sample, log, test,
                       load_recipe(settings, version).strength, settings, version)
        g = timed("interactions", interactions.run, settings, as_of=as_of, spark=spark,
                  version=version)
        if spark is None and settings.train.backend == "mllib":
            spark = get_spark(settings.spark)  # the configured session, not a default one
        tr = timed("train", train.run, settings, as_of=as_of, version=version, spark=spark,
                   sample=sample)
        ev = timed("evaluate", evaluate.run, settings, as_of=as_of, version=version,
                   spark=spark, log=log, test=test, sample=sample)
    finally:
        started = active_session() if running_before is None else None
        if started is not None:
            started.stop()
    save_inputs(settings.model.dir, version, fingerprint)
    p = timed("publish", publish.run, settings, version=version, force=force)
    reload = reload_servers(settings, version) if p["accepted"] else None
    from spark_jobs.staging import load_metrics

    metrics = load_metrics(settings.model.dir, version)
    total = time.perf_counter() - t0
    # the evaluation must never dominate the run it judges: say what share it took (its
    # holdout included, though the search uses that too, and its part of the train step)
    held_out = tr.get("eval_held_out") or {}
    evaluation_s = (steps["evaluate"] + steps["holdout"] + steps["eval_sample"]
                    + held_out.get("seconds", 0.0))
    evaluate_share = round(evaluation_s / total, 3) if total > 0 else None
    progress(f"total {total:.1f} s; evaluation (holdout, sample, its part of train, evaluate) "
             f"{evaluation_s:.1f} s = "
             f"{100 * (evaluate_share or 0):.0f}% of the run")
    return {
        "job": "pipeline",
        "data": data_read(loaded),
        "master": settings.spark.master,
        "backend": tr["backend"],  # the trained one (the tuned recipe may change it)
        "as_of": as_of,
        "compacted": {k: c[k] for k in ("mode", "dates", "start", "end", "bronze_version")},
        "lookback_start": start,
        "version": version,
        "accepted": p["accepted"],
        "status": p["status"],
        "reason": p["reason"],
        "current": p["current"],
        "reload": reload,
        "gate_metric": settings.gate.metric,
        "split": metrics.get("split"),
        "n_test_users": metrics.get("n_test_users"),
        "metrics": metrics.get("models", {}),
        "report": metrics.get("report"),
        "bundle": p["bundle"],
        "counts": {
            "loaded": loaded,
            "bronze_rows": c["bronze_rows"],
            "silver_rows": c["silver_rows"],
            "pairs": g["pairs"],
            "users": g["users"],
            "items": g["items"],
        },
        "tune": {k: v for k, v in tu.items() if k not in ("job",)} if tu else None,
        "train": {k: v for k, v in tr.items() if k not in ("job",)},
        "evaluate_seconds": ev.get("seconds"),
        "evaluation_seconds": round(evaluation_s, 2),
        "evaluate_share": evaluate_share,
        "lake": settings.lake.root,
        "models_dir": settings.model.dir,
        "steps_seconds": steps,
        "seconds": round(total, 2),
    }


def unchanged(settings: Settings, current: str, as_of: date, compacted: dict[str, Any],
              steps: dict[str, float], t0: float) -> dict[str, Any]:
    """The summary of a run that found nothing new: CURRENT's metrics, no new version."""
    from spark_jobs.staging import load_metrics

    reason = (f"nothing new since {current}: the same silver version, as-of date and model "
              f"settings (--retrain trains anyway)")
    progress(reason)
    try:
        metrics = load_metrics(settings.model.dir, current)
    except ValueError:  # a CURRENT published without its staging metrics
        metrics = {}
    total = time.perf_counter() - t0
    progress(f"total {total:.1f} s")
    return {
        "job": "pipeline", "unchanged": True, "master": settings.spark.master, "as_of": as_of,
        "compacted": {k: compacted[k] for k in ("mode", "dates", "start", "end",
                                                "bronze_version")},
        "version": current, "current": current, "accepted": None, "status": "unchanged",
        "reason": reason, "gate_metric": settings.gate.metric,
        "n_test_users": metrics.get("n_test_users"), "metrics": metrics.get("models", {}),
        "report": metrics.get("report"), "lake": settings.lake.root,
        "models_dir": settings.model.dir, "steps_seconds": steps,
        "seconds": round(total, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.pipeline",
                        "Run the batch pipeline end to end and publish a model if it passes.")
    parser.add_argument("--data", choices=DATA_SOURCES, default=None,
                        help="dataset (default data.source from the config)")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, default=None,
                        help="as-of date (default: yesterday (UTC), or the last event date "
                             "when the data ends earlier)")
    parser.add_argument("--backend", choices=("implicit", "mllib"), default=None,
                        help="ALS backend (default train.backend from the config)")
    parser.add_argument("--version", default=None, help="model version (default: a new one)")
    parser.add_argument("--force", action="store_true",
                        help="publish even if the gate rejects the model")
    parser.add_argument("--retrain", action="store_true",
                        help="train even when nothing changed since the CURRENT model")

    def body(args: Any) -> dict[str, Any]:
        settings = settings_from_args(args)
        return run(settings, as_of=args.as_of, data=args.data, backend=args.backend,
                   version=args.version, force=args.force, retrain=args.retrain)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
