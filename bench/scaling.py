"""Scaling: the batch pipeline on synthetic data of growing size, per step, with references.

For each size (events; users and items grow with it up to a 20k-item catalogue) the
pipeline (`python -m spark_jobs.pipeline`, tuning off: the search runs to a fixed wall-clock
budget, so it is no scaling measure) runs in its own process on a fresh lake under
var/bench/, twice:

* **first run** — data generation, full compaction, gold, training, evaluation, publish;
  per step: seconds (from the pipeline's own summary) and the peak resident memory of the
  whole process tree (Python driver + Spark JVM + workers), sampled every 0.2 s and
  attributed to the step the pipeline's progress line says is running;
* **second run, no new events, `--retrain`** — what a night without new data costs when
  it retrains anyway (incremental compaction, gold reused, cached baselines; without
  `--retrain` the pipeline stops after compaction, the model being CURRENT's).

Both on the Spark engine (`spark.engine: spark`), so that the growth from size to size is
one engine's. Where the default (`auto`, `spark_jobs.engine`) would choose the Arrow
engine, a third run on a fresh lake measures that default: what `make pipeline` costs.

Same-run references on the same data:
* raw `implicit` fit on the gold matrix the train step used (same hyper-parameters,
  `threadpool_limits(1, "blas")`), next to the train step;
* Polars doing compaction's and gold's work on the same bronze files in one process
  (read bronze, drop invalid rows, first arrival per (tenant, event_id), strength per event
  with the configured weights / value transform / decay, sum per (user, item), write both
  results as Parquet), next to compact + interactions.

Sizes: 200k and 2M events; `--big-scaling` adds 20M (long on 2 cores: opt-in). The
report gets a table per size, the growth exponent of each step between the two largest
sizes (1 = linear), and a log-log plot of seconds against events per step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import scratch_dir
from bench.report import Report
from lake.config import SparkSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SIZES: dict[str, dict[str, int]] = {
    "200k": {"synthetic_events": 200_000, "synthetic_users": 5_000, "synthetic_items": 2_000},
    "2m": {"synthetic_events": 2_000_000, "synthetic_users": 50_000, "synthetic_items": 20_000},
    "20m": {"synthetic_events": 20_000_000, "synthetic_users": 500_000,
            "synthetic_items": 20_000},
}
STEPS = ("data", "compact", "read_events", "holdout", "eval_sample", "interactions", "train",
         "evaluate", "publish")
SAMPLE_S = 0.2


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_pipeline(env: dict[str, str], *args: str) -> tuple[dict[str, Any], dict[str, int]]:
    """`python -m spark_jobs.pipeline --force [args]` in its own process; returns its summary
    and the peak tree RSS per step (the step named by its latest `[pipeline] <step> ...`
    line)."""
    proc = subprocess.Popen([sys.executable, "-m", "spark_jobs.pipeline", "--force", *args],
                            env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    current = ["start"]
    out: list[str] = []
    err_tail: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("[pipeline]"):
                print(f"[bench]   {line.rstrip()}", file=sys.stderr, flush=True)
                words = line.split()
                if len(words) == 3 and words[2] == "...":
                    current[0] = words[1]
            err_tail[:] = (err_tail + [line])[-40:]

    def read_stdout() -> None:
        assert proc.stdout is not None
        out.extend(proc.stdout)

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=read_stdout, daemon=True)]
    for t in readers:
        t.start()
    peaks: dict[str, int] = {}
    while proc.poll() is None:
        rss = _tree_rss(proc.pid)
        step = current[0]
        peaks[step] = max(peaks.get(step, 0), rss)
        time.sleep(SAMPLE_S)
    for t in readers:
        t.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed (exit {proc.returncode}):\n" + "".join(err_tail))
    return json.loads(out[-1]), peaks


def _env(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LAMBDAREC__LAKE__ROOT": str(root / "lake"),
        "LAMBDAREC__MODEL__DIR": str(root / "models"),
        "LAMBDAREC__DATA__SOURCE": "synthetic",
        "LAMBDAREC__TUNE__ENABLED": "false",
        "LAMBDAREC__SPARK__MASTER": "local[2]",
        **{f"LAMBDAREC__DATA__{k.upper()}": str(v) for k, v in sizes.items()},
    })
    return env


def raw_implicit_fit(root: Path, as_of: Any) -> tuple[float, int]:
    """Seconds of a bare implicit fit on the gold matrix of `as_of` (default train settings)."""
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from lake.config import TrainSettings
    from lake.tables import Lake
    from spark_jobs.matrix import read_gold

    s = TrainSettings()
    csr = sp.csr_matrix(read_gold(Lake(root / "lake"), as_of).csr, dtype=np.float32)
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=s.factors,
                                        regularization=s.effective_regularization,
                                        alpha=s.alpha, iterations=s.iterations,
                                        random_state=s.seed, use_gpu=False)
        t0 = time.perf_counter()
        model.fit(csr, show_progress=False)
        return time.perf_counter() - t0, int(csr.nnz)


def polars_compact_and_aggregate(root: Path, out_dir: Path) -> tuple[float, int, int]:
    """Compaction + gold's aggregation in Polars over the same bronze table; returns
    (seconds, silver rows, gold pairs). Strength as `lake.strength` defines it."""
    import polars as pl

    from lake.config import EVENT_TYPES, InteractionSettings

    cfg = InteractionSettings()
    t0 = time.perf_counter()
    bronze = pl.read_delta(str(root / "lake" / "bronze_events"))
    required = ("event_id", "user_id", "item_id", "event_type", "ts", "received_at")
    silver = (
        bronze.with_columns(pl.col("event_type").str.strip_chars().str.to_lowercase())
        .filter(pl.all_horizontal(pl.col(c).is_not_null() for c in required)
                & pl.col("event_type").is_in(list(EVENT_TYPES))
                & (pl.col("value").is_null() | pl.col("value").is_finite()))
        .sort("received_at", "ts")
        .unique(subset=["tenant", "event_id"], keep="first", maintain_order=True)
    )
    silver.write_parquet(out_dir / "silver.parquet")
    weight = pl.col("event_type").replace_strict(dict(cfg.weights), default=0.0,
                                                 return_dtype=pl.Float64)
    log1p = (pl.col("value").fill_null(1.0).clip(lower_bound=0.0).log1p() / math.log(2))
    transform = pl.when(pl.col("event_type").replace_strict(
        dict(cfg.value_transforms), default="none") == "log1p").then(log1p).otherwise(1.0)
    age_days = (pl.col("ref_ts") - pl.col("ts")).dt.total_seconds() / 86400.0
    decay = (0.5 ** (age_days / cfg.half_life_days)) if cfg.half_life_days else pl.lit(1.0)
    gold = (
        silver.select("user_id", "item_id", "event_type", "value", "ts")
        .with_columns(pl.col("ts").max().over("user_id").alias("ref_ts"))
        .with_columns((weight * transform * decay).alias("score"))
        .filter(pl.col("score") > 0)
        .group_by("user_id", "item_id")
        .agg(pl.col("score").sum().clip(upper_bound=cfg.max_confidence).alias("confidence"),
             pl.len().alias("n_events"), pl.col("ts").max().alias("last_ts"))
    )
    gold.write_parquet(out_dir / "gold.parquet")
    return time.perf_counter() - t0, silver.height, gold.height


def growth_exponent(events: tuple[int, int], seconds: tuple[float, float]) -> float | None:
    """d log(seconds) / d log(events) between two sizes (1 = linear)."""
    if min(seconds) <= 0:
        return None
    return math.log(seconds[1] / seconds[0]) / math.log(events[1] / events[0])


def run(report: Report, *, sizes: tuple[str, ...] = ("200k", "2m")) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for name in sizes:
        spec = SIZES[name]
        n = spec["synthetic_events"]
        root = scratch_dir(f"scaling-{name}-")
        try:
            env = _env(root, spec)
            print(f"[bench] scaling {name}: first run ...", file=sys.stderr, flush=True)
            first, peaks = run_pipeline(env | {"LAMBDAREC__SPARK__ENGINE": "spark"})
            print(f"[bench] scaling {name}: second run, no new events ...", file=sys.stderr,
                  flush=True)
            # --retrain: without it a run with nothing new stops after compaction (~0.1 s);
            # with it every step runs on its incremental path (gold and baselines reused)
            second, _ = run_pipeline(env | {"LAMBDAREC__SPARK__ENGINE": "spark"}, "--retrain")
            raw_s, nnz = raw_implicit_fit(root, date.fromisoformat(str(first["as_of"])))
            pl_s, pl_silver, pl_pairs = polars_compact_and_aggregate(root, root)
            default = None
            if n <= SparkSettings().arrow_max_rows:
                print(f"[bench] scaling {name}: default engine (auto: arrow), fresh lake ...",
                      file=sys.stderr, flush=True)
                for d in ("lake", "models"):
                    shutil.rmtree(root / d, ignore_errors=True)
                default, _ = run_pipeline(env | {"LAMBDAREC__SPARK__ENGINE": "auto"})
        finally:
            shutil.rmtree(root, ignore_errors=True)
        steps = first["steps_seconds"]
        ours_ci = steps["compact"] + steps["interactions"]
        evaluation = first["evaluation_seconds"]
        rows[name] = {"events": n, "steps": steps, "total": first["seconds"],
                      "peaks": peaks, "rerun_total": second["seconds"],
                      "rerun_steps": second["steps_seconds"], "raw_implicit_s": raw_s,
                      "nnz": nnz, "polars_s": pl_s, "polars_rows": (pl_silver, pl_pairs),
                      "ours_rows": (first["counts"]["silver_rows"], first["counts"]["pairs"]),
                      "evaluation_s": evaluation, "evaluate_share": first["evaluate_share"],
                      "default": default}
        report.add(f"scaling.{name}.pipeline_total_s", first["seconds"], "s",
                   "sum of its steps' seconds", sum(steps.values()))
        report.add(f"scaling.{name}.train_s", steps["train"], "s",
                   "raw implicit fit on the same matrix, s", raw_s)
        report.add(f"scaling.{name}.compact_plus_interactions_s", ours_ci, "s",
                   "Polars dedupe + aggregation of the same bronze, s", pl_s)
        report.add(f"scaling.{name}.evaluation_s", evaluation, "s",
                   "pipeline total s (ratio = evaluation's share)", first["seconds"])
        report.add(f"scaling.{name}.rerun_no_new_events_s", second["seconds"], "s",
                   "first run s", first["seconds"])
        report.add(f"scaling.{name}.peak_rss_gib", max(peaks.values()) / 2**30, "GiB",
                   "machine memory GiB", _machine_gib())
        if default is not None:
            report.add(f"scaling.{name}.default_engine_total_s", default["seconds"], "s",
                       "the same on the Spark engine, s", first["seconds"])
    _write(report, rows)
    return rows


def _machine_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def _write(report: Report, rows: dict[str, dict[str, Any]]) -> None:
    names = list(rows)
    md = ["Pipeline (tuning off, Spark engine) per step, seconds and peak tree RSS (GiB) "
          "while the step ran; `local[2]`.", "",
          "| step | " + " | ".join(f"{n} s | {n} GiB" for n in names) + " |",
          "|---|" + "---:|---:|" * len(names)]
    for step in STEPS:
        md.append(f"| {step} | " + " | ".join(
            f"{rows[n]['steps'].get(step, 0):.1f} | {rows[n]['peaks'].get(step, 0) / 2**30:.2f}"
            for n in names) + " |")
    md.append("| **total** | " + " | ".join(
        f"**{rows[n]['total']:.1f}** | {max(rows[n]['peaks'].values()) / 2**30:.2f}"
        for n in names) + " |")
    md += ["", "| size | events | evaluation (holdout, sample, its part of train, evaluate) "
           "| share | rerun, no new events, --retrain | train step | raw implicit fit | "
           "compact + interactions | Polars, same work | rows ours / Polars (silver, pairs) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in names:
        r = rows[n]
        md.append(f"| {n} | {r['events']:,} | {r['evaluation_s']:.1f} s | "
                  f"{100 * r['evaluate_share']:.0f}% | {r['rerun_total']:.1f} s "
                  f"(compact {r['rerun_steps']['compact']:.1f} s) | {r['steps']['train']:.1f} s"
                  f" | {r['raw_implicit_s']:.1f} s | "
                  f"{r['steps']['compact'] + r['steps']['interactions']:.1f} s | "
                  f"{r['polars_s']:.1f} s | {r['ours_rows']} / {r['polars_rows']} |")
    defaults = [n for n in names if rows[n]["default"] is not None]
    if defaults:
        md += ["", "The default engine (`spark.engine: auto`, which picks Arrow at these "
               "sizes), fresh lake, first run:", "",
               "| size | total | compact | interactions | evaluation | share | Spark engine "
               "total |", "|---|---:|---:|---:|---:|---:|---:|"]
        for n in defaults:
            d = rows[n]["default"]
            st = d["steps_seconds"]
            md.append(f"| {n} | **{d['seconds']:.1f} s** | {st['compact']:.1f} s | "
                      f"{st['interactions']:.1f} s | {d['evaluation_seconds']:.1f} s | "
                      f"{100 * d['evaluate_share']:.0f}% | {rows[n]['total']:.1f} s |")
    if len(names) >= 2:
        a, b = names[-2], names[-1]
        ev = (rows[a]["events"], rows[b]["events"])
        md += ["", f"Growth exponent {a} → {b} (d log s / d log events; 1 = linear):", "",
               "| step | exponent |", "|---|---:|"]
        for step in (*STEPS, "total"):
            sa = rows[a]["total"] if step == "total" else rows[a]["steps"].get(step, 0)
            sb = rows[b]["total"] if step == "total" else rows[b]["steps"].get(step, 0)
            g = growth_exponent(ev, (sa, sb))
            md.append(f"| {step} | {'-' if g is None else f'{g:.2f}'} |")
    if "20m" not in names:
        md += ["", "20M events is opt-in: `python -m bench.run --only scaling --big-scaling`."]
    report.note("Scaling: the batch pipeline from 200k events up", "\n".join(md))

    def draw(ax: Any) -> None:
        ev = [rows[n]["events"] for n in names]
        for step in ("compact", "interactions", "train", "evaluate", "publish"):
            ax.plot(ev, [max(rows[n]["steps"].get(step, 0), 1e-2) for n in names],
                    marker="o", label=step)
        ax.plot(ev, [rows[n]["total"] for n in names], marker="s", color="black",
                label="total")
        ax.plot(ev, [rows[n]["raw_implicit_s"] for n in names], ls="--", marker="x",
                label="ref: raw implicit fit")
        ax.plot(ev, [rows[n]["polars_s"] for n in names], ls="--", marker="x",
                label="ref: Polars dedupe + aggregation")
        lo, hi = min(ev), max(ev)
        base = rows[names[0]]["total"]
        ax.plot([lo, hi], [base, base * hi / lo], ls=":", color="grey", label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)

    report.plot("scaling.png", "Pipeline seconds per step vs events (log-log)", draw)
