"""Experiment analysis: per arm estimates with intervals, lift vs control, SRM, a decision.

For each experiment running (or stopped) during the as-of day, from `bronze_impressions`
(the lists its arms served) and `gold_attributed_events` (what they earned,
`spark_jobs.attribution`), over the experiment's life up to the end of the as-of day:

- **Per-user aggregation.** The unit is the user (users are randomised, not lists): one row
  per user and arm with `impressions` (lists shown), `clicks` (distinct (list, item) pairs
  clicked), `purchases`, `revenue` and `purchaser` (0/1). Users seen in several arms
  (broken assignment) are left out and counted.
- **Metrics**, each with a (1 - alpha) interval per arm: `ctr` = clicks / impressions as a
  ratio of per-user sums (variance by the delta method, not as if impressions were
  independent), `conversion` = purchasers / users, `revenue_per_user` (raw mean) and
  `revenue_per_user_winsorised` (each user's revenue capped at the
  `experiments.revenue_winsor_quantile` quantile of the purchasers' revenue, all arms
  pooled: heavy tails would otherwise swamp the interval). Intervals per arm are
  t-intervals on the arm's mean with the variance tea-tasting's aggregates give
  (`Aggregates.ratio_var` for CTR).
- **Lift vs control** (the first arm): relative difference with its interval and the
  p-value of Welch's t-test (tea-tasting `Mean` / `RatioOfMeans`, two-sided).
- **Sample ratio mismatch**: users per arm against the configured shares, Pearson's
  chi-square (two arms: tea-tasting `SampleRatio` with the normal approximation and no
  continuity correction, which is the same test; more arms: `scipy.stats.chisquare`).
  p < `experiments.srm_alpha` (0.001): status `invalid`: assignment or logging is broken,
  no decision is shown.
- **Decision rule: fixed horizon.** Until every arm has `experiments.min_users_per_arm`
  users the status is `collecting` and there is no decision. The first analysis that
  reaches it decides each treatment arm on `experiments.decision_metric` (CTR by default;
  revenue reads the winsorised mean): `better` / `worse` when p < alpha, else
  `no_difference`; later analyses keep that decision (`decided_on`) and only update the
  numbers, so a daily reading does not peek. Choose the horizon before the start for the
  lift you need to see (tea-tasting's power analysis, `RatioOfMeans.solve_power`).

Why tea-tasting (`tea-tasting` on PyPI): it implements exactly these tests on per-user
data: ratio metrics with the delta method (`RatioOfMeans`), Welch's t-test with relative
lift intervals (`Mean`), `SampleRatio` for SRM, CUPED and power analysis for later; it
works on Arrow, pandas and polars frames through narwhals (no Spark or SQL engine needed
for a per-user table) and is maintained and documented. spotify-confidence targets
pandas summary tables and pins older pandas; statsmodels has the tests but no delta-method
ratio metric, so the variance would be hand-written.

Results go to `experiment_results` (partitions `as_of`, `experiment_id`: a rerun
overwrites exactly its own). The core, `analyse(per_user, arms, ...)`, takes plain tables
and arm shares, so tests and the simulator bench (`bench/experiments.py`) call it directly.

    python -m spark_jobs.experiment_analysis                  # as-of yesterday
    python -m spark_jobs.experiment_analysis --as-of 2026-11-21 [--experiment ID]
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import TYPE_CHECKING, Any

from lake.config import ExperimentsSettings, Settings
from spark_jobs.cli import JobError, job_parser, parse_date, run_main, settings_from_args

if TYPE_CHECKING:
    import pyarrow as pa

    from lake.tables import Lake

METRICS = ("ctr", "conversion", "revenue_per_user", "revenue_per_user_winsorised")
DECISION_COLUMN = {"ctr": "ctr", "conversion": "conversion",
                   "revenue_per_user": "revenue_per_user_winsorised"}
PER_USER_COLUMNS = ("user_id", "arm", "impressions", "clicks", "purchases", "purchaser",
                    "revenue")


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    """Configured share of the experiment's users."""


@dataclass(frozen=True)
class ExperimentSpec:
    """What the analysis needs of an experiment (`lake.experiments` holds the rest)."""

    experiment_id: str
    arms: tuple[Arm, ...]
    """In their listed order; the first is the control."""
    name: str = ""
    started_at: datetime | None = None
    stopped_at: datetime | None = None


@dataclass
class Analysis:
    """One experiment's analysis: `rows` as `experiment_results` columns (less the
    experiment's own: as_of, id, name, data window, computed_at)."""

    srm_pvalue: float | None
    status: str
    users: dict[str, int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)
    """Treatment arm -> better | worse | no_difference (empty unless decided)."""


# --------------------------------------------------------------------------- per user


def per_user_table(impressions: pa.Table, attributed: pa.Table, experiment_id: str, *,
                   start: datetime | None = None, end: datetime | None = None
                   ) -> tuple[pa.Table, int]:
    """One row per (user, arm) of the experiment: lists shown and what they earned.

    Args:
        impressions: `bronze_impressions` rows (any experiments; filtered here).
        attributed: `gold_attributed_events` rows (filtered to the experiment's lists).
        experiment_id: the experiment.
        start, end: only lists shown in [start, end) count (None: no bound).

    Returns:
        (`PER_USER_COLUMNS` table sorted by arm and user, users left out for appearing in
        several arms).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = impressions.select(["recommendation_id", "user_id", "arm", "experiment_id", "ts"])
    keep = pc.and_(pc.equal(lists["experiment_id"], experiment_id),
                   pc.and_(pc.is_valid(lists["user_id"]),
                           pc.not_equal(pc.fill_null(lists["arm"], ""), "")))
    if start is not None:
        keep = pc.and_(keep, pc.greater_equal(lists["ts"], pa.scalar(start, lists["ts"].type)))
    if end is not None:
        keep = pc.and_(keep, pc.less(lists["ts"], pa.scalar(end, lists["ts"].type)))
    lists = lists.filter(pc.fill_null(keep, False))
    exposure = lists.group_by(["user_id", "arm"]).aggregate(
        [("recommendation_id", "count_distinct")]).rename_columns(
        ["user_id", "arm", "impressions"])
    arms_per_user = exposure.group_by("user_id").aggregate([([], "count_all")])
    crossed = arms_per_user.filter(pc.greater(arms_per_user["count_all"], 1))["user_id"]
    exposure = exposure.filter(pc.invert(pc.is_in(exposure["user_id"], crossed)))

    ev = attributed.filter(pc.is_in(attributed["recommendation_id"],
                                    lists["recommendation_id"]))
    ev = ev.select(["recommendation_id", "item_id", "user_id", "arm", "event_type", "revenue"])
    clicks = ev.filter(pc.equal(ev["event_type"], "click")).group_by(
        ["recommendation_id", "item_id", "user_id", "arm"]).aggregate([]) \
        .group_by(["user_id", "arm"]).aggregate([([], "count_all")]) \
        .rename_columns(["user_id", "arm", "clicks"])
    bought = ev.filter(pc.equal(ev["event_type"], "purchase"))
    bought = bought.set_column(bought.column_names.index("revenue"), "revenue",
                               pc.fill_null(bought["revenue"], 0.0))
    buys = bought.group_by(["user_id", "arm"]).aggregate(
        [([], "count_all"), ("revenue", "sum")]).rename_columns(
        ["user_id", "arm", "purchases", "revenue"])
    t = exposure.join(clicks, keys=["user_id", "arm"], join_type="left outer") \
        .join(buys, keys=["user_id", "arm"], join_type="left outer")
    purchases = pc.cast(pc.fill_null(t["purchases"], 0), pa.int64())
    t = pa.table({
        "user_id": t["user_id"], "arm": t["arm"],
        "impressions": pc.cast(t["impressions"], pa.int64()),
        "clicks": pc.cast(pc.fill_null(t["clicks"], 0), pa.int64()),
        "purchases": purchases,
        "purchaser": pc.cast(pc.greater(purchases, 0), pa.int64()),
        "revenue": pc.cast(pc.fill_null(t["revenue"], 0.0), pa.float64()),
    })
    t = t.take(pc.sort_indices(t, [("arm", "ascending"), ("user_id", "ascending")]))
    return t, len(crossed)


# --------------------------------------------------------------------------- statistics


def srm_pvalue(users: Mapping[str, int], arms: Sequence[Arm]) -> float | None:
    """Pearson chi-square p-value of the users per arm against the configured shares
    (None without users)."""
    import pyarrow as pa
    import scipy.stats
    import tea_tasting as tt

    observed = [int(users.get(a.name, 0)) for a in arms]
    total = sum(observed)
    if total == 0 or len(arms) < 2:
        return None
    shares = [a.share / sum(x.share for x in arms) for a in arms]
    if len(arms) == 2 and all(observed):
        control, treatment = arms
        data = pa.table({"arm": [control.name] * observed[0] + [treatment.name] * observed[1]})
        srm = tt.SampleRatio({control.name: shares[0], treatment.name: shares[1]},
                             method="norm", correction=False)
        return float(srm.analyze(data, control.name, treatment.name, variant="arm").pvalue)
    return float(scipy.stats.chisquare(observed, [s * total for s in shares]).pvalue)


def _winsorised(per_user: pa.Table, quantile: float) -> tuple[pa.Table, float | None]:
    """`per_user` with `revenue_w` = revenue capped at the quantile of the purchasers'."""
    import numpy as np
    import pyarrow as pa

    revenue = per_user["revenue"].to_numpy()
    positive = revenue[revenue > 0]
    cap = float(np.quantile(positive, quantile)) if positive.size and quantile < 1 else None
    capped = revenue if cap is None else np.minimum(revenue, cap)
    return per_user.append_column("revenue_w", pa.array(capped, pa.float64())), cap


def _arm_interval(aggr: Any, metric: str, alpha: float) -> tuple[float, float, float]:
    """(estimate, lower, upper) of one arm's metric from its tea-tasting aggregates."""
    import scipy.stats

    n = aggr.count()
    if metric == "ctr":
        value = aggr.mean("clicks") / aggr.mean("impressions")
        var = aggr.ratio_var("clicks", "impressions")
    else:
        col = {"conversion": "purchaser", "revenue_per_user": "revenue",
               "revenue_per_user_winsorised": "revenue_w"}[metric]
        value, var = aggr.mean(col), aggr.var(col)
    if n < 2 or not math.isfinite(var):
        return float(value), math.nan, math.nan
    half = float(scipy.stats.t.ppf(1 - alpha / 2, n - 1)) * math.sqrt(max(var, 0.0) / n)
    return float(value), float(value) - half, float(value) + half


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def analyse(per_user: pa.Table, arms: Sequence[Arm], *, alpha: float = 0.05,
            min_users_per_arm: int = 1000, srm_alpha: float = 0.001,
            decision_metric: str = "ctr", winsor_quantile: float = 0.99,
            frozen: Mapping[str, str] | None = None) -> Analysis:
    """Analyse one experiment's per-user table (`per_user_table` columns).

    Args:
        per_user: one row per (user, arm).
        arms: the configured arms in order (the first is the control) and their shares.
        alpha: two-sided significance level; intervals are at 1 - alpha.
        min_users_per_arm: the fixed horizon.
        srm_alpha: SRM p-values below it make the result `invalid`.
        decision_metric: `ctr`, `conversion` or `revenue_per_user` (winsorised).
        winsor_quantile: cap of revenue per user (quantile of the purchasers' revenue).
        frozen: a decision already made at the horizon (treatment arm -> decision): kept.

    Returns:
        The analysis: status (`invalid`, `collecting`, `decided`), SRM p-value, decisions
        and one row per arm and metric.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import tea_tasting as tt
    import tea_tasting.aggr

    if len(arms) < 2:
        raise JobError("an experiment needs at least two arms")
    if decision_metric not in DECISION_COLUMN:
        raise JobError(f"experiments.decision_metric: unknown metric {decision_metric!r}; "
                       f"known: {sorted(DECISION_COLUMN)}")
    names = [a.name for a in arms]
    per_user = per_user.filter(pc.is_in(per_user["arm"], pa.array(names)))
    counts = per_user.group_by("arm").aggregate([([], "count_all"), ("impressions", "sum")])
    users = {a: 0 for a in names}
    impressions = {a: 0 for a in names}
    for r in counts.to_pylist():
        users[r["arm"]], impressions[r["arm"]] = int(r["count_all"]), int(r["impressions_sum"])
    srm = srm_pvalue(users, arms)
    data, cap = _winsorised(per_user, winsor_quantile)
    control = names[0]
    level = 1 - alpha
    aggr = tea_tasting.aggr.read_aggregates(
        data, "arm", has_count=True,
        mean_cols=["clicks", "impressions", "purchaser", "revenue", "revenue_w"],
        var_cols=["clicks", "impressions", "purchaser", "revenue", "revenue_w"],
        cov_cols=[("clicks", "impressions")]) if data.num_rows else {}
    comparisons: dict[str, Any] = {}
    present = [a for a in names if users[a] >= 2]
    if control in present and len(present) > 1:
        experiment = tt.Experiment(
            {"ctr": tt.RatioOfMeans("clicks", "impressions", confidence_level=level),
             "conversion": tt.Mean("purchaser", confidence_level=level),
             "revenue_per_user": tt.Mean("revenue", confidence_level=level),
             "revenue_per_user_winsorised": tt.Mean("revenue_w", confidence_level=level)},
            variant="arm")
        for treatment in present[1:]:
            pair = data.filter(pc.is_in(data["arm"], pa.array([control, treatment])))
            with warnings.catch_warnings():
                # a metric without variance (nobody bought) has no test: scipy warns and
                # gives NaN, stored as null
                warnings.simplefilter("ignore", RuntimeWarning)
                comparisons[treatment] = experiment.analyze(pair, control=control)

    if srm is not None and srm < srm_alpha:
        status = "invalid"
    elif frozen:
        status = "decided"
    elif all(users[a] >= min_users_per_arm for a in names) and len(comparisons) == len(
            names) - 1:
        status = "decided"
    else:
        status = "collecting"
    decisions: dict[str, str] = {}
    if status == "decided":
        if frozen:
            decisions = dict(frozen)
        else:
            goal = DECISION_COLUMN[decision_metric]
            for treatment, result in comparisons.items():
                r = result[goal]
                if r.pvalue < alpha:
                    decisions[treatment] = "better" if r.effect_size > 0 else "worse"
                else:
                    decisions[treatment] = "no_difference"

    rows = []
    for arm in arms:
        for metric in METRICS:
            value = lower = upper = math.nan
            if arm.name in aggr and users[arm.name]:
                value, lower, upper = _arm_interval(aggr[arm.name], metric, alpha)
            row: dict[str, Any] = {
                "arm": arm.name, "control_arm": control, "share": float(arm.share),
                "metric": metric, "users": users[arm.name],
                "impressions": impressions[arm.name], "value": _num(value),
                "ci_lower": _num(lower), "ci_upper": _num(upper), "control_value": None,
                "rel_lift": None, "rel_lift_ci_lower": None, "rel_lift_ci_upper": None,
                "pvalue": None,
                "winsor_cap": cap if metric == "revenue_per_user_winsorised" else None,
                "srm_pvalue": srm, "status": status,
                "decision": decisions.get(arm.name, ""), "decision_metric": decision_metric,
            }
            if arm.name in comparisons:
                r = comparisons[arm.name][metric]
                row.update(control_value=_num(r.control), rel_lift=_num(r.rel_effect_size),
                           rel_lift_ci_lower=_num(r.rel_effect_size_ci_lower),
                           rel_lift_ci_upper=_num(r.rel_effect_size_ci_upper),
                           pvalue=_num(r.pvalue))
            elif arm.name == control and arm.name in aggr and users[arm.name]:
                row["control_value"] = _num(value)
            rows.append(row)
    return Analysis(srm, status, users, rows, decisions)


# --------------------------------------------------------------------------- the job


def experiments_to_analyse(as_of: date, experiment_id: str | None, settings: Settings
                           ) -> list[ExperimentSpec]:
    """The experiments of `lake.experiments` running at some time of the as-of day (or the
    one asked for, whatever its dates)."""
    from lake.experiments import ExperimentStore, StoreError, experiments_file

    try:
        found = [spec_of(e) for e in ExperimentStore(experiments_file(settings)).load()]
    except StoreError as exc:
        raise JobError(str(exc)) from None
    if experiment_id is not None:
        chosen = [e for e in found if e.experiment_id == experiment_id]
        if not chosen:
            raise JobError(f"unknown experiment {experiment_id!r}; experiments: "
                           f"{sorted(e.experiment_id for e in found)}")
        return chosen
    day_start, day_end = _day_bounds(as_of)
    return [e for e in found
            if (e.started_at is None or e.started_at < day_end)
            and (e.stopped_at is None or e.stopped_at >= day_start)]


def spec_of(experiment: Any) -> ExperimentSpec:
    """A `lake.experiments.Experiment` as what the analysis needs of it."""
    return ExperimentSpec(experiment.experiment_id,
                          tuple(Arm(a.name, float(a.share)) for a in experiment.arms),
                          experiment.name, experiment.started_at, experiment.stopped_at)


def _day_bounds(d: date) -> tuple[datetime, datetime]:
    start = datetime.combine(d, dtime(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _frozen_decision(lake: Lake, experiment_id: str, as_of: date
                     ) -> tuple[dict[str, str], date | None]:
    """The decision an earlier analysis made at the horizon (treatment -> decision)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if not lake.exists("experiment_results"):
        return {}, None
    earlier = lake.read("experiment_results", columns=["as_of", "arm", "status", "decision",
                                                      "decided_on"],
                        filters=(ds.field("experiment_id") == experiment_id)
                        & (ds.field("as_of") < as_of))
    earlier = earlier.filter(pc.equal(earlier["status"], "decided"))
    if earlier.num_rows == 0:
        return {}, None
    first = pc.min(earlier["as_of"]).as_py()
    rows = earlier.filter(pc.equal(earlier["as_of"], first)).to_pylist()
    decided_on = rows[0]["decided_on"] or first
    return {r["arm"]: r["decision"] for r in rows if r["decision"]}, decided_on


def analyse_experiment(lake: Lake, exp: ExperimentSpec, as_of: date,
                       cfg: ExperimentsSettings, *, now: datetime | None = None
                       ) -> tuple[list[dict[str, Any]], Analysis, int]:
    """Read the experiment's lists and outcomes up to the end of `as_of` and analyse them;
    returns (`experiment_results` rows, the analysis, users in several arms)."""
    import pyarrow.dataset as ds

    _, day_end = _day_bounds(as_of)
    start = exp.started_at
    end = min(exp.stopped_at, day_end) if exp.stopped_at is not None else day_end
    imp_filter = ds.field("impression_date") <= as_of
    if start is not None:
        imp_filter = imp_filter & (ds.field("impression_date") >= start.date())
    impressions = lake.read("bronze_impressions", columns=["recommendation_id", "user_id",
                                                           "arm", "experiment_id", "ts"],
                            filters=imp_filter & (ds.field("experiment_id") == exp.experiment_id))
    ev_filter = ds.field("experiment_id") == exp.experiment_id
    if start is not None:
        ev_filter = ev_filter & (ds.field("event_date") >= start.date())
    attributed = lake.read("gold_attributed_events", filters=ev_filter)
    per_user, crossed = per_user_table(impressions, attributed, exp.experiment_id,
                                       start=start, end=end)
    frozen, decided_on = _frozen_decision(lake, exp.experiment_id, as_of)
    result = analyse(per_user, exp.arms, alpha=cfg.alpha,
                     min_users_per_arm=cfg.min_users_per_arm, srm_alpha=cfg.srm_alpha,
                     decision_metric=cfg.decision_metric,
                     winsor_quantile=cfg.revenue_winsor_quantile, frozen=frozen)
    if result.status == "decided" and decided_on is None:
        decided_on = as_of
    computed = now or datetime.now(UTC)
    rows = [{"as_of": as_of, "experiment_id": exp.experiment_id,
             "experiment_name": exp.name or None, **r,
             "decided_on": decided_on if result.status == "decided" else None,
             "data_start": start, "data_end": end, "computed_at": computed}
            for r in result.rows]
    return rows, result, crossed


def run(settings: Settings, *, as_of: date | None = None, experiment_id: str | None = None,
        experiments: Sequence[ExperimentSpec] | None = None,
        now: datetime | None = None) -> dict[str, Any]:
    """Analyse the experiments of the as-of day and write `experiment_results`.

    Args:
        settings: project settings (`experiments.*` is the decision rule).
        as_of: the last day of data (default: yesterday, UTC).
        experiment_id: only this experiment (any state).
        experiments: the experiments to analyse instead of reading `lake.experiments`.
        now: the clock (tests).

    Returns:
        `{"job", "as_of", "experiments": {id: {"status", "srm_pvalue", "users",
        "decisions", "users_in_several_arms"}}, "rows", "results_version", "seconds"}`.
    """
    import pyarrow as pa

    from lake.schemas import EXPERIMENT_RESULTS
    from lake.spark_bridge import write_table
    from lake.tables import Lake

    t0 = time.perf_counter()
    as_of = as_of or ((now or datetime.now(UTC)).date() - timedelta(days=1))
    if experiments is None:
        chosen = experiments_to_analyse(as_of, experiment_id, settings)
    else:
        chosen = [e for e in experiments
                  if experiment_id is None or e.experiment_id == experiment_id]
    lake = Lake.from_settings(settings.lake)
    for name in ("bronze_impressions", "gold_attributed_events", "experiment_results"):
        lake.ensure(name)
    out: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for exp in chosen:
        exp_rows, result, crossed = analyse_experiment(lake, exp, as_of, settings.experiments,
                                                       now=now)
        rows += exp_rows
        out[exp.experiment_id] = {"status": result.status, "srm_pvalue": result.srm_pvalue,
                                  "users": result.users, "decisions": result.decisions,
                                  "users_in_several_arms": crossed}
    version = lake.version("experiment_results")
    if chosen:
        version = write_table(
            pa.Table.from_pylist(rows, schema=EXPERIMENT_RESULTS.schema), lake,
            "experiment_results", mode="overwrite",
            partitions=[{"as_of": as_of, "experiment_id": e.experiment_id} for e in chosen])
    return {"job": "experiment_analysis", "as_of": as_of, "experiments": out,
            "rows": len(rows), "results_version": version,
            "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spark_jobs.experiment_analysis",
                        "Analyse the running experiments: per-arm metrics with intervals, "
                        "lift vs control, SRM, the fixed-horizon decision.")
    parser.add_argument("--as-of", dest="as_of", type=parse_date, default=None,
                        help="last day of data (default: yesterday, UTC)")
    parser.add_argument("--experiment", default=None,
                        help="analyse only this experiment id (whatever its dates)")

    def body(args: Any) -> dict[str, Any]:
        return run(settings_from_args(args), as_of=args.as_of, experiment_id=args.experiment)

    return run_main(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
