"""ials (numba, frequency-scaled lambda) vs implicit vs EASE on MovieLens-1M: fit time and NDCG.

All 1,000,209 rated pairs of ML-1M as a binary user x item matrix (value 1.0 per pair), one
seeded random per-user 90/10 split (`spark_jobs.splits.random_split`), full ranking of every
item but the user's training items for every test user (`spark_jobs.metrics.
evaluate_ranking`). Same run, same split, same machine for every row:

* popularity and EASE (lambda 500, 1000) as quality references;
* implicit 0.7.3 through `ImplicitTrainer` (64 factors, lambda 30, alpha 1, 15 iterations;
  `threadpool_limits(1, "blas")` inside it): the speed reference;
* `ScaledALSTrainer` (backend "ials"): 64 and 128 factors, alpha 1, nu = 1, lambda in
  {0.05, 0.1, 0.2}, 15 iterations, exact solves (and `--cg N` rows with N-step CG for the
  intermediate half-steps).

`fit_s` is the trainer's own fit time (implicit: `total_seconds`, i.e. including its exact
final user step, so both sides deliver fold-in-consistent user vectors; its bare `fit` is
printed too). `others` is how many cores other processes kept busy during the fit (this box
is shared; time ratios are only meaningful between rows with similar values). The numba
kernels' first call (compile, or load from numba's on-disk cache) is timed separately;
`--cold` points numba at an empty cache directory to time a cold compile.

    .venv/bin/python bench/ials_speed.py [--seed 0] [--cg 3] [--repeat 2] [--cold]

The data files are read in place from /work/shared/data/ml-1m/ (GroupLens forbids
redistribution; nothing is copied).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT.parent / "shared" / "data" / "ml-1m"
KS = (10, 20)


def load_ml1m(data_dir: Path) -> sp.csr_matrix:
    """Binary users x movies CSR of every rated pair (`interactions.all.csv.gz`, user,movie).

    The file lists all 1,000,209 pairs (ratings and times are known for part of them only,
    see `lake.movielens`; a binary matrix needs neither).
    """
    from bench.tune_als_movielens import load

    return load(data_dir / "interactions.all.csv.gz")


class BusyMeter:
    """Cores kept busy by *other* processes over an interval: machine CPU time from
    /proc/stat minus this process's own CPU time, per wall second."""

    def __enter__(self) -> BusyMeter:
        self._m0, self._p0, self._t0 = self._machine(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        used = (self._machine() - self._m0) - (self._own() - self._p0)
        self.others = max(0.0, used / wall)

    @staticmethod
    def _machine() -> float:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return float("nan")
        # user nice system (idle iowait skipped) irq softirq steal
        busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--cg", type=int, default=0,
                    help="also run ials with this many CG steps per intermediate half-step")
    ap.add_argument("--repeat", type=int, default=1, help="fits per timed row (min is shown)")
    ap.add_argument("--factors", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--no-ease", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="empty numba cache: time a cold compile of the kernels")
    a = ap.parse_args(argv)
    if a.cold:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cold-")

    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    from lake.config import TrainSettings
    from spark_jobs.als import ImplicitTrainer, ScaledALSTrainer
    from spark_jobs.baselines import ease_scorer, factor_scorer, popularity_scorer
    from spark_jobs.matrix import InteractionMatrix
    from spark_jobs.metrics import evaluate_ranking
    from spark_jobs.splits import random_split

    import_s = time.perf_counter() - t0
    x = load_ml1m(a.data_dir)
    split = random_split(x, 0.1, a.seed)
    train = InteractionMatrix(np.arange(x.shape[0]).astype(str),
                              np.arange(x.shape[1]).astype(str), split.train)
    print(f"ML-1M {x.shape[0]} users x {x.shape[1]} items, {x.nnz} pairs; train "
          f"{split.train.nnz}, test {split.test.nnz} (random 90/10, seed {a.seed}); "
          f"import {import_s:.2f}s", flush=True)

    # The kernels' first call: compile or cache load, on a tiny matrix (both solvers).
    tiny = InteractionMatrix(np.arange(3).astype(str), np.arange(2).astype(str),
                             sp.csr_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])))
    warm: dict[str, float] = {}
    for cg in (0, a.cg) if a.cg else (0,):
        t0 = time.perf_counter()
        ScaledALSTrainer(TrainSettings(backend="ials", factors=2, iterations=2),
                         cg_steps=cg).fit(tiny)
        warm["cholesky" if cg == 0 else f"cg{cg}"] = time.perf_counter() - t0
    cache = os.environ.get("NUMBA_CACHE_DIR", "next to spark_jobs/als.py")
    print("numba first call (" + ("cold compile" if a.cold else "compile or cache load")
          + f", cache {cache}): " + ", ".join(f"{k} {v:.2f}s" for k, v in warm.items()),
          flush=True)

    rows: list[dict[str, Any]] = []

    def evaluate(name: str, score: Any, fit_s: float, others: float, **kw: Any) -> None:
        res = evaluate_ranking(score, split.train, split.test, KS)
        rows.append({"model": name, "fit_s": fit_s, "others": others,
                     "ndcg@10": res.metrics["ndcg@10"], "recall@20": res.metrics["recall@20"],
                     **kw})
        r = rows[-1]
        print(f"  {name:10s} {kw} fit {fit_s:.2f}s ndcg@10 {r['ndcg@10']:.4f} "
              f"(others busy {others:.2f} cores)", flush=True)

    def timed(fit: Callable[[], Any]) -> tuple[Any, float, float]:
        """Best of `--repeat` fits: (ALSFactors, total_seconds, others busy meanwhile)."""
        best, res, others = float("inf"), None, 0.0
        for _ in range(a.repeat):
            with BusyMeter() as busy:
                res = fit()
            secs = res.info["total_seconds"]
            if secs < best:
                best, others = secs, busy.others
        return res, best, others

    with BusyMeter() as busy:
        t0 = time.perf_counter()
        pop = popularity_scorer(split.train)
        d = time.perf_counter() - t0
    evaluate("popularity", pop, d, busy.others)
    if not a.no_ease:
        for lam in (500.0, 1000.0):
            with BusyMeter() as busy:
                t0 = time.perf_counter()
                score = ease_scorer(split.train, lam)
                d = time.perf_counter() - t0
            evaluate("ease", score, d, busy.others, lam=lam)

    base: dict[str, Any] = dict(alpha=1.0, iterations=15, seed=42, use_gpu=False)
    s = TrainSettings(backend="implicit", factors=64, regularization=30.0, **base)
    res, secs, others = timed(lambda: ImplicitTrainer(s).fit(train))
    evaluate("implicit", factor_scorer(res.user_factors, res.item_factors), secs, others,
             factors=64, lam=30.0, nu=0.0, solver=f"cg3 (bare fit {res.info['fit_seconds']}s)")
    implicit_s = secs
    for f in a.factors:
        for lam in a.lambdas:
            for cg in (0, a.cg) if a.cg else (0,):
                s = TrainSettings(backend="ials", factors=f, regularization=lam,
                                  reg_exponent=1.0, **base)
                trainer = ScaledALSTrainer(s, cg_steps=cg)
                res, secs, others = timed(functools.partial(trainer.fit, train))
                evaluate("ials", factor_scorer(res.user_factors, res.item_factors), secs,
                         others, factors=f, lam=lam, nu=1.0, solver=res.info["solver"])

    print()
    print("| model | factors | lambda | nu | solver | fit s | x implicit | others busy "
          "| NDCG@10 | Recall@20 |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['fit_s'] / implicit_s:.2f}" if r["model"] in ("implicit", "ials") else ""
        print(f"| {r['model']} | {r.get('factors', '')} | {r.get('lam', '')} "
              f"| {r.get('nu', '')} | {r.get('solver', '')} | {r['fit_s']:.2f} | {ratio} "
              f"| {r['others']:.2f} | {r['ndcg@10']:.4f} | {r['recall@20']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
