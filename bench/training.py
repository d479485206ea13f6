"""Training: our train step vs raw `implicit` fit vs Spark MLlib ALS, on the same matrix.

* ours: `spark_jobs.train.run` (Delta read of the gold snapshot -> id maps + CSR -> implicit
  fit + exact final user solve -> staged model), then the bundle export + serving index
  (`lake.bundle.write_bundle` with `lake.vector_index.build_and_save`, what publish does).
* raw implicit: `AlternatingLeastSquares.fit` on the same CSR, same hyper-parameters,
  `threadpool_limits(1, "blas")` as STACK.md advises — nothing else.
* Spark MLlib: `spark_jobs.als.MLlibTrainer.fit` on the same matrix (local[2]; includes
  handing the matrix to Spark as Parquet and collecting the factors), fewer iterations
  to bound the time; compared per iteration.

Gold comes from one `spark_jobs.pipeline` run per dataset (`bench.datasets`), shared with
the accuracy section.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.datasets import data_available, pipeline_for
from bench.fixtures import scratch_dir
from bench.report import Report


def _raw_implicit(csr: Any, s: Any) -> float:
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from spark_jobs.als import implicit_model

    cui = sp.csr_matrix(csr, dtype=np.float32)
    with threadpool_limits(1, "blas"):
        # The trainer's own constructor: the same hyper-parameters, defaults resolved alike.
        model = implicit_model(s, use_gpu=False)
        t0 = time.perf_counter()
        model.fit(cui, show_progress=False)
        return time.perf_counter() - t0


def _export(settings: Any, version: str) -> float:
    from lake.bundle import write_bundle
    from lake.vector_index import build_and_save
    from spark_jobs.staging import load_staged

    model = load_staged(settings.model.dir, version)
    out = scratch_dir("export-")
    try:
        t0 = time.perf_counter()
        write_bundle(out, version, user_ids=model.user_ids, item_ids=model.item_ids,
                     user_factors=model.user_factors, item_factors=model.item_factors,
                     user_items=model.user_items, item_popularity=model.item_popularity,
                     foldin=model.foldin, backend=model.backend, params=model.params,
                     write_index=lambda f, p: build_and_save(f, p, settings.index))
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _mllib(matrix: Any, settings: Any, iterations: int) -> float:
    from lake.config import TrainSettings
    from lake.spark_session import get_spark
    from spark_jobs.als import MLlibTrainer

    spark = get_spark(settings.spark)
    # regularization None: MLlib's default lambda (count-scaled), not implicit's setting
    ts = TrainSettings(**{**settings.train.model_dump(), "backend": "mllib",
                          "iterations": iterations, "regularization": None, "use_gpu": False})
    trainer = MLlibTrainer(ts, spark)
    t0 = time.perf_counter()
    trainer.fit(matrix)
    return time.perf_counter() - t0


def run(report: Report, *, datasets: tuple[str, ...] = ("ml-1m",),
        mllib_iterations: int = 5,
        pipelines: Callable[[str], dict[str, Any]] = pipeline_for) -> dict[str, Any]:
    """Measure every dataset in `datasets` (those present; the others are listed skipped).

    Args:
        report: where the figures and the section's table go.
        datasets: dataset names `pipelines` knows.
        mllib_iterations: MLlib's iterations (its time at 1 iteration is taken out).
        pipelines: `data` -> `{"settings", "summary"}` of a pipeline run on it (default
            `bench.datasets.pipeline_for`; a test hands in a tiny lake's).
    """
    from lake.tables import Lake
    from spark_jobs import train
    from spark_jobs.matrix import read_gold

    rows, out, skipped = [], {}, []
    for data in datasets:
        if not data_available(data):
            skipped.append(data)
            continue
        pr = pipelines(data)
        settings, summary = pr["settings"], pr["summary"]
        as_of = summary["as_of"]
        it = settings.train.iterations
        version = f"bench-train-{int(time.time())}"
        t0 = time.perf_counter()
        tr = train.run(settings, as_of=as_of, version=version)
        train_s = time.perf_counter() - t0
        export_s = _export(settings, version)
        ours = train_s + export_s
        matrix = read_gold(Lake.from_settings(settings.lake), as_of)
        raw_s = _raw_implicit(matrix.csr, settings.train)
        ml1_s = _mllib(matrix, settings, 1)
        ml_s = _mllib(matrix, settings, mllib_iterations)
        ml_marginal = (ml_s - ml1_s) / max(1, mllib_iterations - 1)
        shape = f"{matrix.shape[0]:,} users x {matrix.shape[1]:,} items, {matrix.nnz:,} nnz"
        report.add(f"training.{data}.ours.s_per_iter", ours / it, "s/iteration",
                   "raw implicit fit s/iteration", raw_s / it)
        report.add(f"training.{data}.ours.fit_only.s_per_iter", tr["fit_seconds"] / it,
                   "s/iteration", "raw implicit fit s/iteration", raw_s / it)
        report.add(f"training.{data}.mllib.s_per_iter", ml_s / mllib_iterations, "s/iteration",
                   "raw implicit fit s/iteration", raw_s / it)
        report.add(f"training.{data}.mllib.marginal_s_per_iter", ml_marginal, "s/iteration",
                   "raw implicit fit s/iteration", raw_s / it)
        report.add(f"training.{data}.ours.total_s", ours, "s",
                   f"raw implicit fit s ({it} it)", raw_s)
        rows.append((data, shape, it, tr["seconds"], tr["fit_seconds"], export_s, ours, raw_s,
                     mllib_iterations, ml_s, ml_marginal))
        out[data] = {"train": tr, "export_s": export_s, "raw_implicit_s": raw_s,
                     "mllib_s": ml_s, "pipeline_steps": summary.get("steps_seconds")}
    md = ["| data | matrix | iters | train.run s (read+matrix+fit+stage) | of which fit s | "
          "export+index s | ours total s | ours s/it | raw implicit s (s/it) | MLlib s "
          "(iters, s/it) | MLlib marginal s/it |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {d} | {sh} | {it} | {trs:.1f} | {fit:.1f} | {ex:.1f} | {o:.1f} | {o / it:.2f} | "
           f"{r:.1f} ({r / it:.2f}) | {m:.1f} ({mi}, {m / mi:.2f}) | {mm:.2f} |"
           for d, sh, it, trs, fit, ex, o, r, mi, m, mm in rows]
    md += ["", "ours s/it = (train.run + export/index) / iterations, i.e. everything the batch "
           "layer does for a model, spread over the sweeps; MLlib s/it includes Spark's "
           "per-job overhead (Parquet hand-off, collect), as our number includes ours; "
           "MLlib marginal s/it = (time at "
           f"{mllib_iterations} iterations - time at 1) / {mllib_iterations - 1}, Spark's fixed "
           "cost taken out."]
    if "synthetic-10m" not in datasets:
        md += ["", "The 10M-interaction synthetic size is opt-in (`python -m bench.run --only "
               "training --big-training`): generating, compacting and training 10M events "
               "takes well over the bench budget on 2 cores."]
    if skipped:
        md += ["", f"Skipped (data missing): {', '.join(skipped)}."]
    report.note("Training: our step vs raw implicit vs Spark MLlib", "\n".join(md))
    return out
