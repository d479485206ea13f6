"""A model recipe: everything that turns events into served scores, and its offline score.

    Recipe(strength, train, blend)

* `strength` — how events become interaction strengths (`lake.strength`),
* `train`    — the ALS backend and its hyper-parameters (`lake.config.TrainSettings`),
* `blend`    — the popularity mix for short histories (`lake.blend`).

The tuning search proposes recipes and writes the chosen one to the version's
`tuning.json` (`tuning_path`); the evaluation scores it against the baselines, the gold
job and the trainer apply it to all data (`load_recipe`), and the bundle carries its
strength and blend so the online layer scores exactly as the evaluation did.
`fit_and_score` is the one offline path from (events, recipe) to ranking metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from lake.blend import BlendParams, blended_scores, popularity_prior
from lake.config import Settings, TrainSettings
from lake.strength import StrengthParams
from spark_jobs.als import ALSFactors, make_trainer, train_params
from spark_jobs.matrix import InteractionMatrix
from spark_jobs.metrics import RankingResult, ScoreFn, evaluate_ranking
from spark_jobs.staging import staged_dir

TUNING_JSON = "tuning.json"
TRAIN_KEYS = ("backend", "factors", "regularization", "iterations", "alpha", "reg_exponent",
              "seed")


@dataclass(frozen=True)
class Recipe:
    strength: StrengthParams
    train: TrainSettings
    blend: BlendParams

    @classmethod
    def from_settings(cls, settings: Settings) -> Recipe:
        return cls(StrengthParams.from_settings(settings.interactions), settings.train,
                   BlendParams())

    def to_dict(self) -> dict[str, Any]:
        return {"strength": self.strength.to_dict(), "train": train_params(self.train),
                "blend": self.blend.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: TrainSettings) -> Recipe:
        train = base.model_copy(update={k: v for k, v in d["train"].items() if k in TRAIN_KEYS})
        return cls(StrengthParams.from_dict(d["strength"]), train,
                   BlendParams.from_dict(d.get("blend")))

    def summary(self) -> str:
        t, s = self.train, self.strength
        tf = ",".join(f"{k}:{v}" for k, v in sorted(s.transforms.items())
                      if v != "none") or "none"
        return (f"{t.backend} f={t.factors} lambda={t.effective_regularization:.4g}"
                + (f" nu={t.reg_exponent:g}" if t.backend == "ials" else "")
                + f" alpha={t.alpha:.3g} it={t.iterations} half_life={s.half_life_days}"
                f" values={tf} blend(beta={self.blend.beta:g}, n0={self.blend.n0:g})")


def tuning_path(models_dir: Path | str, version: str) -> Path:
    """Where the recipe search of `version` writes its result (`spark_jobs.tune`)."""
    return staged_dir(models_dir, version) / TUNING_JSON


def load_recipe(settings: Settings, version: str | None) -> Recipe:
    """The tuned recipe of `version` when its search ran, else the configured one."""
    if version:
        p = tuning_path(settings.model.dir, version)
        if p.exists():
            return Recipe.from_dict(json.loads(p.read_text())["best"], settings.train)
    return Recipe.from_settings(settings)


def item_prior(train: sp.csr_matrix) -> np.ndarray:
    """The blend's popularity prior: training users per item, scaled to [0, 1]."""
    x = sp.csr_matrix(train)
    return popularity_prior(np.bincount(x.indices, minlength=x.shape[1]))


def recipe_scorer(fitted: ALSFactors, train: sp.csr_matrix, blend: BlendParams) -> ScoreFn:
    """Scores as served: x_u . y_i + w(n_u) * prior_i."""
    prior = item_prior(train)
    n_hist = np.diff(sp.csr_matrix(train).indptr)
    u, v = fitted.user_factors, fitted.item_factors

    def score(rows: np.ndarray) -> np.ndarray:
        return blended_scores(u[rows], v, n_hist[rows], prior, blend)

    return score


def score_batch_size(n_items: int) -> int:
    return max(64, min(2048, 20_000_000 // max(1, n_items)))


@dataclass
class Scored:
    fitted: ALSFactors
    result: RankingResult
    fit_seconds: float
    seconds: float


def fit_and_score(
    matrix: sp.csr_matrix,
    test: sp.csr_matrix,
    recipe: Recipe,
    ks: Sequence[int],
    users: np.ndarray,
    *,
    spark: Any = None,
) -> Scored:
    """Fit `recipe.train` on the strength matrix, score `users` against `test`."""
    t0 = time.perf_counter()
    m = InteractionMatrix(np.arange(matrix.shape[0]).astype(str),
                          np.arange(matrix.shape[1]).astype(str), matrix)
    fitted = make_trainer(recipe.train, spark).fit(m, users)  # only `users` are scored
    return score_fitted(fitted, matrix, test, recipe, ks, users, time.perf_counter() - t0)


def score_fitted(
    fitted: ALSFactors,
    matrix: sp.csr_matrix,
    test: sp.csr_matrix,
    recipe: Recipe,
    ks: Sequence[int],
    users: np.ndarray,
    fit_seconds: float,
) -> Scored:
    """Score `users` of `fitted` (trained in `fit_seconds`) as served, against `test`."""
    t0 = time.perf_counter()
    result = evaluate_ranking(recipe_scorer(fitted, matrix, recipe.blend), matrix, test, ks,
                              users=users, batch_size=score_batch_size(matrix.shape[1]))
    return Scored(fitted, result, round(fit_seconds, 3),
                  round(fit_seconds + time.perf_counter() - t0, 3))


def sample_users(test: sp.csr_matrix, max_users: int, seed: int) -> np.ndarray:
    """Rows with at least one test item; a seeded sample of `max_users` when more."""
    users = np.flatnonzero(np.diff(sp.csr_matrix(test).indptr) > 0)
    if len(users) > max_users:
        rng = np.random.default_rng(seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    return users
