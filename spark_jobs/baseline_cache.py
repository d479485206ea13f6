"""Baseline results scored once per evaluation input and reused by every later evaluation.

The reference baselines (popularity, and EASE or item-kNN: `spark_jobs.baselines`) only
see the *binarised* training matrix, the test pairs, the evaluated users and the cut-offs.
A rerun of `evaluate` for the same version, a second model evaluated on the same data (a
retried DAG task, a backend comparison, the next night when no event arrived) hands them
the same inputs, so their results are stored under a fingerprint of exactly those inputs:

    <models dir>/cache/baselines/<fingerprint>.npz   (no pickle: arrays + one JSON string)

The fingerprint covers the training pairs (not their strengths, which the baselines never
read), the test pairs, the users, the cut-offs, the baseline settings and
`DEFINITION_VERSION` (bump it when a baseline's definition changes), so a hit returns what
scoring would have returned, and anything that could change the answer is a miss. The
newest `KEEP` files are kept; older ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from lake.config import EvaluateSettings
from spark_jobs.baselines import ease_scorer, itemknn_scorer, popularity_scorer
from spark_jobs.metrics import RankingResult, evaluate_ranking

CACHE_DIR = Path("cache") / "baselines"
DEFINITION_VERSION = 1
KEEP = 16
"""Cached baseline result files kept per models dir (each a few MB at 20k users)."""


def chosen_baselines(n_items: int, ev: EvaluateSettings) -> tuple[str, ...]:
    """Popularity, plus EASE where it is cheap (items x items inverse) or item-kNN above."""
    return ("popularity", "ease" if n_items <= ev.ease_max_items else "itemknn")


def fingerprint(train: sp.csr_matrix, test: sp.csr_matrix, users: np.ndarray,
                ks: Sequence[int], ev: EvaluateSettings) -> str:
    """Hash of everything the baselines' results depend on."""
    h = hashlib.blake2b(digest_size=16)
    names = chosen_baselines(train.shape[1], ev)
    h.update(json.dumps({"v": DEFINITION_VERSION, "shape": train.shape, "ks": sorted(ks),
                         "baselines": names,
                         "ease_lambda": ev.ease_lambda if "ease" in names else None},
                        sort_keys=True).encode())
    for m in (sp.csr_matrix(train), sp.csr_matrix(test)):
        m = m.copy()
        m.eliminate_zeros()  # an explicit zero is no interaction for any baseline
        m.sort_indices()
        h.update(m.indptr.astype(np.int64).tobytes())
        h.update(m.indices.astype(np.int64).tobytes())
    h.update(np.asarray(users, np.int64).tobytes())
    return h.hexdigest()


def _save(path: Path, results: dict[str, RankingResult]) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for name, r in results.items():
        meta[name] = {"metrics": r.metrics, "n_users": r.n_users,
                      "per_user": sorted(r.per_user), "ks": sorted(r.rec_counts)}
        arrays[f"{name}.users"] = r.users
        for m, v in r.per_user.items():
            arrays[f"{name}.per_user.{m}"] = v
        for k, c in r.rec_counts.items():
            arrays[f"{name}.rec_counts.{k}"] = c
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, allow_pickle=False, **arrays)  # plain arrays only (and typed: no array fills it)
    os.replace(tmp, path)  # readers see a whole file or none


def _load(path: Path) -> dict[str, RankingResult]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return {name: RankingResult(
            metrics={k: float(v) for k, v in m["metrics"].items()},
            n_users=int(m["n_users"]),
            rec_counts={int(k): z[f"{name}.rec_counts.{k}"] for k in m["ks"]},
            per_user={p: z[f"{name}.per_user.{p}"] for p in m["per_user"]},
            users=z[f"{name}.users"],
        ) for name, m in meta.items()}


def _prune(directory: Path, keep: int) -> None:
    files = sorted(directory.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)


def score(train: sp.csr_matrix, test: sp.csr_matrix, users: np.ndarray, ks: Sequence[int],
          ev: EvaluateSettings, batch_size: int) -> dict[str, RankingResult]:
    """Score the chosen baselines on `users` (full ranking, training items excluded)."""
    scorers = {"popularity": lambda: popularity_scorer(train),
               "ease": lambda: ease_scorer(train, ev.ease_lambda),
               "itemknn": lambda: itemknn_scorer(train)}
    return {name: evaluate_ranking(scorers[name](), train, test, ks, users=users,
                                   batch_size=batch_size)
            for name in chosen_baselines(train.shape[1], ev)}


def baseline_results(
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    users: np.ndarray,
    ks: Sequence[int],
    ev: EvaluateSettings,
    *,
    batch_size: int,
    models_dir: Path | str | None,
) -> tuple[dict[str, RankingResult], dict[str, Any]]:
    """The baselines' results, from the cache under `models_dir` when it has them.

    Returns the results and facts for the report: `baselines_cached` (bool),
    `baselines_seconds`, `baselines_key`. `models_dir=None` scores without a cache.
    """
    t = time.perf_counter()
    key = fingerprint(train, test, users, ks, ev)
    path = None if models_dir is None else Path(models_dir) / CACHE_DIR / f"{key}.npz"
    results: dict[str, RankingResult] | None = None
    if path is not None and path.exists():
        try:
            results = _load(path)
        except (OSError, ValueError, KeyError):  # a damaged entry is scored again
            results = None
    cached = results is not None
    if results is None:
        results = score(train, test, users, ks, ev, batch_size)
        if path is not None:
            _save(path, results)
            _prune(path.parent, KEEP)
    return results, {"baselines_cached": cached, "baselines_key": key,
                     "baselines_seconds": round(time.perf_counter() - t, 3)}
