"""Tune ALS on MovieLens-1M: all 1,000,209 pairs, random per-user 90/10 split, full ranking.

Standalone (reads the CSV directly, no lake/Spark): popularity and EASE baselines and a grid
of implicit ALS settings, evaluated with spark_jobs.metrics on the same split. One JSON line
per model on stdout.

    .venv/bin/python bench/tune_als_movielens.py [--grid quick|full] [--csv PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lake.config import TrainSettings  # noqa: E402
from spark_jobs.als import ImplicitTrainer  # noqa: E402
from spark_jobs.baselines import ease_scorer, factor_scorer, popularity_scorer  # noqa: E402
from spark_jobs.matrix import InteractionMatrix  # noqa: E402
from spark_jobs.metrics import evaluate_ranking  # noqa: E402
from spark_jobs.splits import random_split  # noqa: E402

CSV = Path(__file__).resolve().parents[2] / "shared/data/ml-1m/interactions.all.csv.gz"


def load(csv: Path) -> sp.csr_matrix:
    df = pd.read_csv(csv)
    u = df.iloc[:, 0].astype("category").cat.codes.to_numpy()
    i = df.iloc[:, 1].astype("category").cat.codes.to_numpy()
    x = sp.csr_matrix((np.ones(len(df)), (u, i)), shape=(u.max() + 1, i.max() + 1))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def out(name: str, res, secs: float, **kw) -> None:
    m = res.metrics
    print(json.dumps({"model": name, "ndcg@10": round(m["ndcg@10"], 4),
                      "recall@20": round(m["recall@20"], 4), "map@10": round(m["map@10"], 4),
                      "coverage@10": round(m["coverage@10"], 4), "fit_s": round(secs, 2), **kw}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="quick")
    ap.add_argument("--no-baselines", action="store_true")
    a = ap.parse_args()
    x = load(a.csv)
    split = random_split(x, 0.1, a.seed)
    print(json.dumps({"users": x.shape[0], "items": x.shape[1], "nnz": x.nnz,
                      "train": split.train.nnz, "test": split.test.nnz}), flush=True)
    ks = [10, 20]
    if not a.no_baselines:
        t = time.perf_counter()
        s = popularity_scorer(split.train)
        out("popularity", evaluate_ranking(s, split.train, split.test, ks),
            time.perf_counter() - t)
        for lam in (500.0, 1000.0):
            t = time.perf_counter()
            s = ease_scorer(split.train, lam)
            d = time.perf_counter() - t
            t = time.perf_counter()
            r = evaluate_ranking(s, split.train, split.test, ks)
            out("ease", r, d, lam=lam, eval_s=round(time.perf_counter() - t, 2))
    m = InteractionMatrix(np.arange(x.shape[0]).astype(str), np.arange(x.shape[1]).astype(str),
                          split.train)
    grids = {
        "quick": dict(factors=[64], regularization=[0.01, 0.1, 1.0], alpha=[1.0, 2.0, 5.0],
                      iterations=[15]),
    }
    g = grids.get(a.grid) or json.loads(a.grid)
    for f, reg, al, it in itertools.product(g["factors"], g["regularization"], g["alpha"],
                                            g["iterations"]):
        ts = TrainSettings(factors=f, regularization=reg, alpha=al, iterations=it, seed=42,
                           use_gpu=False)
        t = time.perf_counter()
        res = ImplicitTrainer(ts, final_user_step=g.get("final", True)).fit(m)
        d = time.perf_counter() - t
        r = evaluate_ranking(factor_scorer(res.user_factors, res.item_factors), split.train,
                             split.test, ks)
        out("als", r, d, factors=f, reg=reg, alpha=al, iters=it)


if __name__ == "__main__":
    main()
