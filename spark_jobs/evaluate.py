"""Batch job: evaluate a staged model's recipe against baselines on a per-user holdout.

    python -m spark_jobs.evaluate --as-of 2024-01-31 --version v20240131

1. The events of the lookback window up to the end of `as_of` (`spark_jobs.event_log`).
2. Holdout (`evaluate.split`): `user_time` (default) holds out each user's last
   `test_fraction` of distinct items by first-touch time — every user with at least
   `min_user_items` items is tested on their own latest items, so a log that thins out
   at the end still gives many test users; `random` holds out that share at random.
   A held-out pair loses all its events from training.
3. The staged model's recipe (strength, ALS, blend: `spark_jobs.recipe`) is fit on the
   remaining events and scored as served (blend included) — or, when the train job left
   the scored users' held-out pairs out of the production fit (`spark_jobs.eval_sample`),
   the staged item factors are scored without a second fit; popularity, EASE (up to
   `ease_max_items` items) or item-kNN (above) are scored on the same users: full
   ranking over all items, training items excluded, at most `max_eval_users` users. The
   baselines' results are cached per input fingerprint (`spark_jobs.baseline_cache`): a
   rerun on the same data scores only the model.
4. Bootstrap intervals over users (`spark_jobs.intervals`) for the headline metrics, and
   the paired interval of ALS minus popularity on the gate metric: the gate's evidence.
5. `<models>/reports/<version>/report.md` + plots; `<models>/staging/<version>/
   metrics.json` (shape documented in `spark_jobs.staging`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import scipy.sparse as sp

from lake.config import Settings
from lake.tables import Lake
from spark_jobs.baseline_cache import baseline_results
from spark_jobs.baselines import popularity
from spark_jobs.cli import job_parser, parse_date, run_main, settings_from_args
from spark_jobs.eval_sample import HELD_OUT_KEY, EvalSample, staged_factors, version_sample
from spark_jobs.event_log import EventLog, Holdout, holdout, lookback_log
from spark_jobs.intervals import bootstrap_ci, paired_diff_ci
from spark_jobs.metrics import RankingResult, popularity_deciles
from spark_jobs.recipe import Recipe, fit_and_score, score_batch_size, score_fitted
from spark_jobs.report_plots import GateLine, gate_line
from spark_jobs.staging import TrainedModel, load_staged, save_metrics

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

REPORTS = "reports"
MODEL_KEY = "als"


def eval_holdout(log: EventLog, settings: Settings) -> Holdout:
    """The evaluation's test pairs (the tuning search removes the same ones)."""
    ev = settings.evaluate
    return holdout(log, ev.split, ev.test_fraction, ev.min_user_items, settings.train.seed)


def ci_metrics(settings: Settings) -> list[str]:
    """Metrics that get intervals: the gate metric and recall/ndcg at 20 when computed."""
    wanted = [settings.gate.metric] + [f"{m}@20" for m in ("recall", "ndcg")
                                       if 20 in settings.evaluate.k]
    return list(dict.fromkeys(wanted))


def evaluate_recipe(
    sample: EvalSample,
    test: Holdout,
    recipe: Recipe,
    settings: Settings,
    *,
    spark: SparkSession | None = None,
    staged: TrainedModel | None = None,
) -> tuple[dict[str, RankingResult], dict[str, Any], sp.csr_matrix]:
    """Score `recipe` and the baselines on the sample's test users.

    The recipe's ALS is fit on the training events, unless `staged` left exactly the
    sample's held-out pairs out of its fit (`spark_jobs.eval_sample`): then its item
    factors are scored as shipped.

    Returns per-model results, run facts and the training strength matrix.
    """
    ev = settings.evaluate
    matrix, users = sample.train, sample.users
    facts: dict[str, Any] = {"n_test_users": int(len(users)),
                             "excluded_tuning_users": sample.excluded_tuning_users}
    results: dict[str, RankingResult] = {}
    ks = sorted(ev.k)
    reused, why_refit = None, ""
    left_out = (staged.info.get(HELD_OUT_KEY) or {}) if staged is not None else {}
    if staged is not None and left_out:
        if left_out.get("fingerprint") != sample.fingerprint:
            why_refit = " (the staged fit left out other pairs than this holdout's)"
        else:
            reused = staged_factors(staged.item_ids, staged.item_factors, staged.foldin, sample)
            why_refit = " (an item of the events has no staged factor)"
    if reused is not None:
        fitted, solve_s = reused
        scored = score_fitted(fitted, matrix, test.test, recipe, ks, users, solve_s)
        facts["als_protocol"] = (f"the staged item factors (its fit left out the "
                                 f"{left_out.get('pairs')} held-out pairs of these users)")
    else:
        scored = fit_and_score(matrix, test.test, recipe, ks, users, spark=spark)
        facts["als_protocol"] = "refit on the training events" + why_refit
        facts["als_info"] = scored.fitted.info
    results[MODEL_KEY] = scored.result
    facts["als_fit_seconds"] = scored.fit_seconds
    facts["als_seconds"] = scored.seconds
    baselines, cache_facts = baseline_results(
        matrix, test.test, users, ks, ev, batch_size=score_batch_size(matrix.shape[1]),
        models_dir=settings.model.dir)
    results.update(baselines)
    facts.update(cache_facts)
    if "ease" not in baselines:
        facts["ease_skipped"] = f"{matrix.shape[1]} items > ease_max_items={ev.ease_max_items}"
    return results, facts, matrix


def intervals(results: dict[str, RankingResult], settings: Settings) -> dict[str, Any]:
    """Bootstrap intervals per model and metric, and ALS - popularity (paired)."""
    ev = settings.evaluate
    out: dict[str, Any] = {"confidence": ev.confidence, "bootstrap": ev.bootstrap,
                           "models": {}, "vs_popularity": {}}
    if ev.bootstrap == 0:
        return out
    seed = settings.train.seed
    for name, res in results.items():
        out["models"][name] = {m: [round(x, 6) for x in bootstrap_ci(
            res.per_user[m], ev.bootstrap, ev.confidence, seed)]
            for m in ci_metrics(settings) if m in res.per_user}
    als, pop = results.get(MODEL_KEY), results.get("popularity")
    if als is not None and pop is not None:
        for m in ci_metrics(settings):
            if m in als.per_user:
                d, lo, hi = paired_diff_ci(als.per_user[m], pop.per_user[m], ev.bootstrap,
                                           ev.confidence, seed)
                out["vs_popularity"][m] = {"diff": round(d, 6), "ci": [round(lo, 6),
                                                                       round(hi, 6)]}
    return out


# -- report -------------------------------------------------------------------------------
def write_report(
    out_dir: Path,
    *,
    version: str,
    as_of: date | None,
    split_info: dict[str, Any],
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    recipe: Recipe,
    ci: dict[str, Any],
    results: dict[str, RankingResult],
    facts: dict[str, Any],
    ks: Sequence[int],
    tuning_plot: Path | None = None,
    gate: GateLine | None = None,
) -> Path:
    """report.md + metrics_vs_k.png + popularity_deciles.png under `out_dir`."""
    from spark_jobs import report_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted(ks)
    names = list(results)
    metrics = {n: results[n].metrics for n in names}
    report_plots.save(report_plots.metrics_vs_k(metrics, ks, version=version, gate=gate),
                      out_dir / "metrics_vs_k.png")

    pop = popularity(train)
    k_plot = 10 if 10 in ks else ks[0]
    deciles = {n: popularity_deciles(results[n].rec_counts[k_plot], pop) for n in names}
    report_plots.save(report_plots.popularity_deciles(deciles, k_plot, version=version),
                      out_dir / "popularity_deciles.png")

    lines = [
        f"# Evaluation report — model `{version}`",
        "",
        f"- as-of: {as_of}",
        f"- split: **{split_info.get('protocol')}** {split_info}",
        f"- train: {train.shape[0]} users x {train.shape[1]} items, {train.nnz} interactions; "
        f"test: {int(test.nnz)} held-out pairs",
        f"- evaluated users: {facts['n_test_users']} (full ranking over all items, "
        "training items excluded"
        + (f"; the {facts['excluded_tuning_users']} users the recipe search scored are left "
           "out)" if facts.get("excluded_tuning_users") else ")"),
        f"- recipe: {recipe.summary()}",
        f"- ALS: {facts.get('als_protocol')}, {facts.get('als_fit_seconds')} s"
        + (f" ({facts['als_info'].get('device')})" if "als_info" in facts else ""),
    ]
    if "baselines_seconds" in facts:
        how = "read from the cache" if facts.get("baselines_cached") else "scored"
        lines.append(f"- baselines: {how} in {facts['baselines_seconds']} s "
                     f"(key {facts.get('baselines_key')})")
    if gate is not None:
        lines.append(f"- gate threshold (dashed in the plot): {gate.metric} >= {gate.label}")
    if "ease_skipped" in facts:
        lines.append(f"- EASE skipped: {facts['ease_skipped']}; item-kNN is the strong baseline")
    lines += ["", "## Metrics", ""]
    cols = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "map", "coverage")]
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[n].metrics[c]:.4f}" for c in cols) + " |")
    if ci.get("models"):
        level = f"{100 * ci['confidence']:g}%"
        lines += ["", f"## {level} bootstrap intervals ({ci['bootstrap']} resamples of the "
                  "test users)", "", "| model | metric | value | interval |", "|---|---|---|---|"]
        for n, per in ci["models"].items():
            for m, (lo, hi) in per.items():
                lines.append(f"| {n} | {m} | {results[n].metrics[m]:.4f} | "
                             f"[{lo:.4f}, {hi:.4f}] |")
        for m, d in ci.get("vs_popularity", {}).items():
            lines.append(f"| als - popularity (paired) | {m} | {d['diff']:+.4f} | "
                         f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] |")
    lines += ["", "![metrics vs k](metrics_vs_k.png)", "",
              f"## Popularity of recommended items (top-{k_plot})", "",
              "| model | " + " | ".join(f"d{d + 1}" for d in range(10)) + " |",
              "|---|" + "---|" * 10]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in deciles[n]) + " |")
    lines += ["", "![popularity deciles](popularity_deciles.png)", ""]
    if tuning_plot is not None and Path(tuning_plot).exists():
        lines += ["## Tuning search", "", "![trials](trials.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- job ----------------------------------------------------------------------------------
def run(
    settings: Settings, *, as_of: date, version: str, spark: SparkSession | None = None,
    log: EventLog | None = None, test: Holdout | None = None,
    sample: EvalSample | None = None,
) -> dict[str, Any]:
    """Evaluate staged model `version` (its recipe) on the holdout of the events to `as_of`.

    Returns:
        `{"job", "version", "split", "n_test_users", "<gate metric>": {model: value},
        "report", "baselines_cached", "seconds"}`; also writes metrics.json next to the
        staged model.
    """
    t0 = time.perf_counter()
    staged = load_staged(settings.model.dir, version)
    recipe = Recipe.from_dict(staged.params["recipe"], settings.train) \
        if "recipe" in staged.params else Recipe.from_settings(settings)
    lake = Lake.from_settings(settings.lake)
    if log is None:
        log = lookback_log(lake, as_of, settings.interactions.lookback_days)
    if test is None:
        test = eval_holdout(log, settings)
    if sample is None:
        sample = version_sample(log, test, recipe.strength, settings, version)
    results, facts, train = evaluate_recipe(sample, test, recipe, settings, spark=spark,
                                            staged=staged)
    ci = intervals(results, settings)
    ev = settings.evaluate
    out_dir = Path(settings.model.dir) / REPORTS / version
    report = write_report(
        out_dir, version=version, as_of=as_of, split_info=test.info, train=train,
        test=test.test, recipe=recipe, ci=ci, results=results, facts=facts, ks=ev.k,
        tuning_plot=out_dir / "trials.png",
        gate=gate_line(settings.gate.metric, results["popularity"].metrics
                       if "popularity" in results else None,
                       settings.gate.min_lift_over_popularity),
    )
    metrics = {
        "split": test.info.get("protocol"),
        "k": sorted(ev.k),
        "n_test_users": facts["n_test_users"],
        "min_test_users": ev.min_test_users,
        "models": {n: r.metrics for n, r in results.items()},
        "intervals": ci,
        "recipe": recipe.to_dict(),
        "report": str(report),
        "split_info": test.info,
        "facts": facts,
    }
    save_metrics(settings.model.dir, version, metrics)
    headline = settings.gate.metric
    return {
        "job": "evaluate",
        "version": version,
        "split": test.info.get("protocol"),
        "n_test_users": facts["n_test_users"],
        headline: {n: round(r.metrics[headline], 4) for n, r in results.items()
                   if headline in r.metrics},
        "report": str(report),
        "baselines_cached": facts["baselines_cached"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = job_parser("spark_jobs.evaluate",
                   "Evaluate a staged model against popularity, EASE / item-kNN on a holdout.")
    p.add_argument("--as-of", dest="as_of", type=parse_date, required=True)
    p.add_argument("--version", required=True, help="staged model version")
    p.add_argument("--split", choices=["user_time", "random"], default=None)
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=None)
    p.add_argument("--gate-margin", dest="gate_margin", type=float, default=None,
                   help="gate.min_lift_over_popularity the report's threshold line shows "
                        "(the DAG passes its run's gate_margin)")

    def body(args: Any) -> dict[str, Any]:
        ev = {k: getattr(args, k) for k in ("split", "test_fraction")
              if getattr(args, k) is not None}
        gate = ({"min_lift_over_popularity": args.gate_margin}
                if args.gate_margin is not None else {})
        settings = settings_from_args(args, evaluate=ev, gate=gate)
        spark = None
        if load_staged(settings.model.dir, args.version).backend == "mllib":
            from lake.spark_session import get_spark

            spark = get_spark(settings.spark)
        return run(settings, as_of=args.as_of, version=args.version, spark=spark)

    return run_main(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
