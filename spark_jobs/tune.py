"""Nightly hyper-parameter search: a bounded, seeded search for the best `Recipe`.

    python -m spark_jobs.tune --as-of 2026-11-21 --version v20261121-ab12

Data: the events of the lookback window (`spark_jobs.event_log`) and the evaluation's
holdout (`spark_jobs.evaluate.eval_holdout`). The users are split in two by a seeded hash
of their id (`spark_jobs.splits.tuning_users`, share `tune.validation_users`): each trial
fits ALS on the evaluation's training events and scores the *tuning* users' held-out items
on the gate metric; the evaluation then scores only the other users. The search thus
validates on the same time slice and history depth the evaluation tests on, and never
sees an evaluated user's test items.

Search (deterministic for `tune.seed`; `tune.budget_s` — CPU seconds of this process, so
that a busy box runs the same trials as an idle one — and `tune.max_trials` bound it; no
trial starts once the budget is spent):
1. trial 0 is the configured recipe, trial 1 the other single-node backend at its
   customary settings, then a few random draws of backend (implicit / ials, alternating),
   factors, lambda (log-uniform, scaled for `ials` by n ** nu at the median history
   length), nu and alpha — at most 30% of the budget;
2. around the best: lambda x 1/3 and x 3, then alpha x 1/2 and x 2 (each further while it
   improves) — up to 60% of the budget; then the decay half-life and, for event types
   that carry values, the value transform, alternating — up to 85%; then twice the
   factors and lambda x 0.7 and x 1.4;
3. the popularity blend (beta, n0) on the best trial's factors: a grid, no refit.

Writes `<models>/staging/<version>/tuning.json` (the chosen recipe and every trial) and a
`model_runs` row per trial (status `trial`, version `<version>.tNN`); the gold job and the
trainer of the same version then apply the chosen recipe to all data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from lake.blend import BlendParams
from lake.config import Settings
from lake.strength import StrengthParams
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args
from spark_jobs.evaluate import REPORTS, eval_holdout
from spark_jobs.event_log import EventLog, Holdout, lookback_log
from spark_jobs.metrics import evaluate_ranking
from spark_jobs.recipe import (
    Recipe,
    fit_and_score,
    recipe_scorer,
    sample_users,
    score_batch_size,
    tuning_path,
)
from spark_jobs.splits import tuning_users

if TYPE_CHECKING:
    from lake.tables import Lake

TRIAL_STATUS = "trial"
FACTORS = (32, 64, 128)
HALF_LIVES: tuple[float | None, ...] = (None, 7.0, 30.0, 180.0)
BLEND_BETAS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
BLEND_N0 = (3.0, 10.0, 30.0, 100.0, 1000.0)
"""n0 of w(n) = beta n0 / (n0 + n): small values favour popularity only for short histories,
large ones make it a near-constant popularity bias (the shrinkage of frequency-scaled lambda
under-ranks popular items; a constant bias restores them)."""
BLEND_EVALS = len(BLEND_BETAS) - 1 + len(BLEND_N0) - 1 + 2
"""Evaluations of the blend's coordinate search (`choose_blend`)."""
LAMBDA_AT_MEDIAN = (0.03, 300.0)
"""Range of the effective lambda of a median-length history (log-uniform)."""
ALPHA = (0.3, 30.0)
SEARCH_BACKENDS = {"implicit": ("implicit", "ials"), "ials": ("ials", "implicit")}
ANCHORS: dict[str, dict[str, Any]] = {
    # Spark's customary lambda 0.1 x n with alpha 1 (the best ials region on MovieLens-1M)
    "ials": {"backend": "ials", "factors": 128, "regularization": 0.1, "alpha": 1.0,
             "reg_exponent": 1.0},
    # implicit at lambda 100, alpha 6 (the best implicit region on the synthetic shop data)
    "implicit": {"backend": "implicit", "factors": 64, "regularization": 100.0, "alpha": 6.0},
}
MAX_FACTORS = 256
REG_EXPONENTS = (0.75, 1.0)
RANDOM_TRIALS = 2
"""Random draws after the anchors: most land far from the optimum (seen on MovieLens-1M and
the synthetic shop), so the budget goes to refining around the best instead."""
MIN_GAIN = 0.002
"""Relative validation gain a trial needs to replace the best one: below it, a step is a
tie, and walking on through ties (alpha 0.5 -> 0.03 in +0.1% steps) drifts on noise."""
RANDOM_SHARE, REFINE_SHARE, STRENGTH_SHARE = 0.3, 0.6, 0.85
"""Shares of the budget the anchor/random, the lambda/alpha and the strength stages may use up
to (more factors and a finer lambda get the rest), so that slow trials on big data still try
recency and value transforms, which gained most on MovieLens-1M (+0.5% NDCG@10)."""


@dataclass
class Trial:
    n: int
    stage: str
    recipe: Recipe
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    fit_seconds: float = 0.0
    budget_seconds: float = 0.0
    """What the trial took on the budget's clock (CPU seconds unless `search(now=...)`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "stage": self.stage, "recipe": self.recipe.to_dict(),
                "summary": self.recipe.summary(), "metric": self.metric,
                "metrics": self.metrics, "seconds": self.seconds,
                "fit_seconds": self.fit_seconds, "cpu_seconds": round(self.budget_seconds, 3)}


@dataclass
class TuneResult:
    best: Recipe
    trials: list[Trial]
    metric: str
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        best_metric = max((t.metric for t in self.trials if t.metric is not None),
                          default=None)
        return {"best": self.best.to_dict(), "best_summary": self.best.summary(),
                "best_metric": best_metric, "metric": self.metric,
                "trials": [t.to_dict() for t in self.trials], "info": self.info}


def _valued_types(log: EventLog, params: StrengthParams) -> list[str]:
    """Active event types of which some events carry a value (rating, count, quantity)."""
    has_value = ~np.isnan(log.value)
    return sorted({str(t) for t in log.type_names[np.unique(log.type_code[has_value])]}
                  & set(params.active_types))


def _median_history(matrix: Any) -> float:
    n = np.diff(matrix.indptr)
    n = n[n > 0]
    return float(np.median(n)) if n.size else 1.0


def _with_train(recipe: Recipe, **changes: Any) -> Recipe:
    return Recipe(recipe.strength, recipe.train.model_copy(update=changes), recipe.blend)


def random_proposals(base: Recipe, n: int, rng: np.random.Generator,
                     median_n: float) -> list[Recipe]:
    """Draws of backend, factors, lambda, (nu) and alpha around nothing in particular.

    The single-node backends alternate (implicit's unscaled lambda and ials's
    frequency-scaled one each win on some data); MLlib stays MLlib."""
    backends = SEARCH_BACKENDS.get(base.train.backend, (base.train.backend,))
    out = []
    for n_draw in range(n):
        backend = backends[n_draw % len(backends)]
        lam_eff = math.exp(rng.uniform(*np.log(LAMBDA_AT_MEDIAN)))
        changes: dict[str, Any] = {
            "backend": backend,
            "factors": int(rng.choice(FACTORS)),
            "alpha": round(math.exp(rng.uniform(*np.log(ALPHA))), 4),
        }
        nu = float(rng.choice(REG_EXPONENTS)) if backend == "ials" else None
        if backend == "mllib":
            nu = 1.0  # MLlib's own scaling: lambda x n
        if nu is None:
            changes["regularization"] = round(lam_eff, 5)
        else:
            if backend == "ials":
                changes["reg_exponent"] = nu
            changes["regularization"] = float(f"{lam_eff / median_n ** nu:.5g}")
        out.append(_with_train(base, **changes))
    return out


def anchor_proposals(base: Recipe) -> list[Recipe]:
    """The other single-node backend at its customary settings (a strong first guess)."""
    return [_with_train(base, **ANCHORS[b]) for b in SEARCH_BACKENDS.get(base.train.backend, ())
            if b != base.train.backend]


def strength_proposals(best: Recipe, valued: Sequence[str], span_days: float) -> list[Recipe]:
    """The best recipe with another half-life, or another value transform per valued type,
    alternating, so that a budget that runs out still tried both recency and values."""
    s = best.strength
    half_lives = [Recipe(s.with_changes(half_life_days=hl), best.train, best.blend)
                  for hl in HALF_LIVES
                  if hl != s.half_life_days and (hl is None or hl < span_days)]
    transforms = [Recipe(s.with_changes(transforms=dict(s.transforms) | {t: tf}), best.train,
                         best.blend)
                  for t in valued for tf in ("none", "linear", "log1p")
                  if tf != s.transforms.get(t, "none")]
    return [r for pair in zip_longest(transforms, half_lives) for r in pair if r is not None]


def search(log: EventLog, settings: Settings, test: Holdout, *,
           now: Any = time.process_time) -> TuneResult:
    """Search on the training events of the evaluation's holdout `test`, scoring the
    tuning users' test items."""
    cfg, ev = settings.tune, settings.evaluate
    metric = settings.gate.metric
    t0 = now()
    tuning = tuning_users(log.user_ids, cfg.validation_users, settings.train.seed)
    val_test = sp.diags(tuning.astype(np.float64)) @ test.test
    val_test.eliminate_zeros()
    users = sample_users(val_test, cfg.max_eval_users, cfg.seed)
    if len(users) == 0:
        raise JobError("the validation split has no users; too few events to tune")
    ks = sorted({int(metric.split("@")[1]), *ev.k}) if "@" in metric else list(ev.k)
    base = Recipe.from_settings(settings)
    rng = np.random.default_rng(cfg.seed)
    matrices: dict[str, Any] = {}

    def matrix_for(r: Recipe) -> Any:
        key = json.dumps(r.strength.to_dict(), sort_keys=True)
        if key not in matrices:
            matrices.clear()  # one strength setting at a time: bounded memory
            matrices[key] = log.matrix(r.strength, test.train_events)
        return matrices[key]

    median_n = _median_history(matrix_for(base))
    trials: list[Trial] = []
    best: dict[str, Any] = {"trial": None, "scored": None}

    def blend_reserve() -> float:
        """Budget kept for the blend search: its evaluations score like a trial, without
        the fit (estimated from the defaults trial)."""
        if not settings.blend.enabled or not trials:
            return 0.0
        first = trials[0]
        score_share = 1.0 - first.fit_seconds / first.seconds if first.seconds else 1.0
        return BLEND_EVALS * first.budget_seconds * max(0.0, score_share)

    def budget_left(share: float = 1.0) -> bool:
        """Room for another trial within `share` of the budget, less the blend's reserve
        (the last trial's length is the estimate of the next)."""
        last = trials[-1].budget_seconds if trials else 0.0
        return (len(trials) < cfg.max_trials
                and (now() - t0) + last <= share * cfg.budget_s - blend_reserve())

    def run_trial(stage: str, recipe: Recipe) -> None:
        trial = Trial(len(trials), stage, recipe)
        trials.append(trial)
        started = now()
        scored = fit_and_score(matrix_for(recipe), val_test, recipe, ks, users)
        trial.metrics = {k: round(v, 6) for k, v in scored.result.metrics.items()}
        trial.metric = scored.result.metrics.get(metric)
        trial.seconds, trial.fit_seconds = scored.seconds, scored.fit_seconds
        trial.budget_seconds = now() - started
        cur = best["trial"]
        if trial.metric is not None and (cur is None
                                         or trial.metric > cur.metric * (1 + MIN_GAIN)):
            best["trial"], best["scored"] = trial, scored

    run_trial("defaults", base)
    for r in anchor_proposals(base):
        if budget_left(RANDOM_SHARE):
            run_trial("anchor", r)
    for r in random_proposals(base, RANDOM_TRIALS, rng, median_n):
        if not budget_left(RANDOM_SHARE):
            break
        run_trial("random", r)
    refine(run_trial, best, budget_left, "regularization", (1 / 3, 3.0), REFINE_SHARE)
    refine(run_trial, best, budget_left, "alpha", (0.5, 2.0), REFINE_SHARE)
    span_days = float((log.ts.max() - log.ts.min()) / 86400.0) if log.n_events else 0.0
    for r in strength_proposals(best["trial"].recipe, _valued_types(log, base.strength),
                                span_days):
        if not budget_left(STRENGTH_SHARE):
            break
        run_trial("strength", r)
    lead: Recipe = best["trial"].recipe
    if lead.train.factors < MAX_FACTORS and budget_left():
        run_trial("refine", _with_train(lead, factors=2 * lead.train.factors))
    # lambda's optimum is sharp under frequency scaling (x1.4 can cost 2% NDCG): a finer pass
    refine(run_trial, best, budget_left, "regularization", (0.7, 1.4), 1.0)
    chosen: Recipe = best["trial"].recipe
    blend_info: dict[str, Any] = {}
    if settings.blend.enabled:
        chosen, blend_info = choose_blend(best["scored"], matrix_for(chosen), val_test, chosen,
                                          metric, ks, users)
    info = {"validation": {"protocol": "tuning users' holdout items",
                           "users_fraction": cfg.validation_users,
                           "tuning_users": int(tuning.sum()),
                           "candidate_events": int(test.train_events.sum())},
            "validation_users": int(len(users)),
            "median_history": median_n, "budget_seconds_used": round(now() - t0, 3),
            "budget_s": cfg.budget_s, "max_trials": cfg.max_trials, "seed": cfg.seed,
            "blend": blend_info}
    return TuneResult(chosen, trials, metric, info)


def refine(run_trial: Any, best: dict[str, Any], budget_left: Any, key: str,
           steps: tuple[float, float], share: float) -> None:
    """`key` (regularization or alpha) x steps[0] and x steps[1] around the best so far,
    one step further while it improves; the other direction only if the first did not."""
    lead: Recipe = best["trial"].recipe
    start = lead.train.effective_regularization if key == "regularization" \
        else float(getattr(lead.train, key))
    for step in steps:
        factor = step
        while budget_left(share):
            before = best["trial"]
            run_trial("refine", _with_train(lead, **{key: float(f"{start * factor:.5g}")}))
            if best["trial"] is before:
                break
            factor *= step
        if best["trial"].recipe != lead:
            return


def choose_blend(scored: Any, matrix: Any, test: Any, recipe: Recipe, metric: str,
                 ks: Sequence[int], users: np.ndarray) -> tuple[Recipe, dict[str, Any]]:
    """The blend (beta, n0) that scores best on validation, with the trial's factors.

    Coordinate search: beta over BLEND_BETAS at the default n0, n0 over BLEND_N0 at the
    best beta, then beta's two neighbours at the best n0 (at most BLEND_EVALS evaluations,
    not the whole grid). beta = 0 is the trial's own score.
    """
    grid: list[dict[str, Any]] = []
    default_n0 = BlendParams().n0
    best_b, best_v = BlendParams(), float(scored.result.metrics[metric])
    grid.append({"beta": 0.0, "n0": default_n0, metric: round(best_v, 6)})

    def consider(b: BlendParams) -> None:
        nonlocal best_b, best_v
        res = evaluate_ranking(recipe_scorer(scored.fitted, matrix, b), matrix, test, ks,
                               users=users, batch_size=score_batch_size(matrix.shape[1]))
        v = res.metrics[metric]
        grid.append({"beta": b.beta, "n0": b.n0, metric: round(v, 6)})
        if v > best_v + 1e-9:
            best_b, best_v = b, v

    for beta in BLEND_BETAS[1:]:
        consider(BlendParams(beta, default_n0))
    if best_b.active:
        for n0 in BLEND_N0:
            if n0 != default_n0:
                consider(BlendParams(best_b.beta, n0))
    if best_b.n0 != default_n0:  # n0 changed what beta means: its neighbours once more
        i = BLEND_BETAS.index(best_b.beta)
        for beta in BLEND_BETAS[max(1, i - 1):i + 2]:
            if beta != best_b.beta:
                consider(BlendParams(beta, best_b.n0))
    return Recipe(recipe.strength, recipe.train, best_b), {"grid": grid,
                                                          "chosen": best_b.to_dict()}


# -- persistence --------------------------------------------------------------------------
def record_trials(lake: Lake, version: str, as_of: date, result: TuneResult) -> None:
    """One `model_runs` row per trial (status `trial`, version `<version>.tNN`)."""
    now = datetime.now(UTC)
    rows = [{
        "model_version": f"{version}.t{t.n:02d}", "created_at": now, "as_of": as_of,
        "backend": t.recipe.train.backend,
        "params": json.dumps(t.recipe.to_dict() | {"stage": t.stage}, sort_keys=True),
        "metrics": json.dumps({"validation": t.metrics, "seconds": t.seconds},
                              sort_keys=True),
        "status": TRIAL_STATUS, "gate_reason": None, "bundle_path": None,
    } for t in result.trials]
    if rows:
        lake.upsert("model_runs", pa.Table.from_pylist(rows))


def trials_plot(result: TuneResult, path: Path, version: str) -> Path:
    """Validation metric per trial, coloured by stage, the chosen one circled."""
    from spark_jobs import report_plots

    points: dict[str, list[tuple[int, float]]] = {}
    for t in result.trials:
        if t.metric:
            points.setdefault(t.stage, []).append((t.n, t.metric))
    best = result.best.to_dict()
    chosen = next(((t.n, t.metric) for t in result.trials
                   if t.metric and t.recipe.to_dict() == best), None)
    return report_plots.save(
        report_plots.trials(points, result.metric, version=version, chosen=chosen), path)


def run(settings: Settings, *, as_of: date, version: str, log: EventLog | None = None,
        test: Holdout | None = None) -> dict[str, Any]:
    """Search, write tuning.json and the trial rows; returns a summary."""
    from lake.tables import Lake

    t0 = time.perf_counter()
    lake = Lake.from_settings(settings.lake)
    if log is None:
        log = lookback_log(lake, as_of, settings.interactions.lookback_days)
    if test is None:
        test = eval_holdout(log, settings)
    result = search(log, settings, test)
    path = tuning_path(settings.model.dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = trials_plot(result, Path(settings.model.dir) / REPORTS / version / "trials.png",
                       version)
    payload = result.to_dict() | {"version": version, "as_of": as_of.isoformat(),
                                  "plot": str(plot)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    record_trials(lake, version, as_of, result)
    return {"job": "tune", "version": version, "as_of": as_of, "trials": len(result.trials),
            "best": result.best.summary(), "best_metric": payload["best_metric"],
            "metric": result.metric, "tuning": str(path),
            "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    p = job_parser("spark_jobs.tune", "Search the model recipe on a validation split.")
    p.add_argument("--as-of", dest="as_of", type=parse_date, required=True)
    p.add_argument("--version", required=True, help="model version the recipe is for")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=None,
                   help="CPU-seconds budget of the search (default tune.budget_s)")

    def body(args: Any) -> dict[str, Any]:
        tune = {"budget_s": args.budget_s} if args.budget_s is not None else {}
        return run(settings_from_args(args, tune=tune), as_of=args.as_of, version=args.version)

    return run_main(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
