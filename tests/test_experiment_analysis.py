"""Experiment analysis (spark_jobs.experiment_analysis): SRM, intervals and lift on
hand-computable fixtures, per-user aggregation, the fixed-horizon decision, the job."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
import scipy.stats

from lake import schemas
from lake.config import load_settings
from lake.tables import Lake
from spark_jobs import experiment_analysis as ea
from spark_jobs.experiment_analysis import Arm, ExperimentSpec


@pytest.fixture
def impressions_spec() -> schemas.TableSpec:
    return schemas.BRONZE_IMPRESSIONS


HALF = (Arm("control", 0.5), Arm("treatment", 0.5))


def users(arm: str, n: int, *, clicks: int = 0, impressions: int = 1, start: int = 0,
          revenue: float = 0.0) -> list[dict[str, Any]]:
    return [{"user_id": f"{arm}{start + i}", "arm": arm, "impressions": impressions,
             "clicks": clicks, "purchases": int(revenue > 0), "purchaser": int(revenue > 0),
             "revenue": revenue} for i in range(n)]


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


# --------------------------------------------------------------------------- SRM


def test_srm_flags_a_60_40_split_configured_as_50_50() -> None:
    # n = 10,000: chi2 = 2 x 1000^2 / 5000 = 400 on 1 df, p ~ 5e-89
    data = table(users("control", 6000) + users("treatment", 4000, clicks=1))
    a = ea.analyse(data, HALF, min_users_per_arm=100)
    assert a.srm_pvalue is not None and a.srm_pvalue < 1e-80
    assert a.srm_pvalue == pytest.approx(scipy.stats.chi2.sf(400.0, 1), rel=1e-6)
    assert a.status == "invalid"
    assert a.decisions == {}  # a large "lift", but no decision on a broken split
    assert {r["status"] for r in a.rows} == {"invalid"}
    assert {r["decision"] for r in a.rows} == {""}


def test_srm_passes_an_even_split() -> None:
    data = table(users("control", 5000) + users("treatment", 5000))
    a = ea.analyse(data, HALF, min_users_per_arm=100)
    assert a.srm_pvalue == pytest.approx(1.0)
    assert a.status == "decided"


def test_srm_against_unequal_shares_and_three_arms() -> None:
    # 2,000 / 8,000 configured 20 / 80: exactly as expected
    arms = (Arm("control", 0.2), Arm("treatment", 0.8))
    assert ea.srm_pvalue({"control": 2000, "treatment": 8000}, arms) == pytest.approx(1.0)
    # 3 arms, expected 1000 each, observed 1100 / 950 / 950: chi2 = (100^2 + 2 x 50^2) / 1000
    three = (Arm("a", 1 / 3), Arm("b", 1 / 3), Arm("c", 1 / 3))
    p = ea.srm_pvalue({"a": 1100, "b": 950, "c": 950}, three)
    assert p == pytest.approx(scipy.stats.chi2.sf(15.0, 2), rel=1e-9)
    # an arm that got nobody is a mismatch too
    assert ea.srm_pvalue({"control": 500}, HALF) < 1e-50


# --------------------------------------------------------------------------- intervals


def test_ctr_interval_and_lift_on_a_hand_computed_fixture() -> None:
    """Control: 4 users with (clicks, impressions) (1,2) (0,2) (2,4) (1,4): CTR = 4/12.
    Per user: mean clicks 1, mean impressions 3, var(clicks) 2/3, var(impr) 4/3,
    cov 2/3 (n - 1 denominators). Delta method: var = (2/3 - 2 (2/3)(1/3) + (4/3)(1/9)) / 9
    = 10/243, se = sqrt(10/243 / 4). Treatment (2,2) (1,2) (3,4) (2,4): CTR 8/12, the same
    variance 10/243 (clicks shifted by +1 keep var and cov; (2/3 - 2(2/3)(2/3) +
    (4/3)(4/9)) / 9 = 10/243)."""
    data = table([
        *({"user_id": f"c{i}", "arm": "control", "clicks": c, "impressions": n,
           "purchases": 0, "purchaser": 0, "revenue": 0.0}
          for i, (c, n) in enumerate([(1, 2), (0, 2), (2, 4), (1, 4)])),
        *({"user_id": f"t{i}", "arm": "treatment", "clicks": c, "impressions": n,
           "purchases": 0, "purchaser": 0, "revenue": 0.0}
          for i, (c, n) in enumerate([(2, 2), (1, 2), (3, 4), (2, 4)])),
    ])
    a = ea.analyse(data, HALF, min_users_per_arm=2, alpha=0.05)
    rows = {(r["arm"], r["metric"]): r for r in a.rows}
    se = math.sqrt(10 / 243 / 4)
    t3 = 3.182446305284263  # t(0.975, df 3)
    c = rows[("control", "ctr")]
    assert c["value"] == pytest.approx(1 / 3)
    assert (c["ci_lower"], c["ci_upper"]) == (pytest.approx(1 / 3 - t3 * se),
                                              pytest.approx(1 / 3 + t3 * se))
    assert (c["ci_lower"], c["ci_upper"]) == (pytest.approx(0.010537, abs=1e-6),
                                              pytest.approx(0.656129, abs=1e-6))
    t = rows[("treatment", "ctr")]
    assert t["value"] == pytest.approx(2 / 3) and t["control_value"] == pytest.approx(1 / 3)
    assert t["rel_lift"] == pytest.approx(1.0)
    # Welch: equal variances and sizes, df = 6; statistic (1/3) / sqrt(2 x 10/243 / 4)
    stat = (1 / 3) / math.sqrt(2 * 10 / 243 / 4)
    assert t["pvalue"] == pytest.approx(2 * scipy.stats.t.sf(stat, 6), rel=1e-9)
    assert t["pvalue"] == pytest.approx(0.05914, abs=1e-5)
    # relative interval on the log scale: var / mean^2 per arm, 10/27 and 10/108, n = 4
    la, lb = (10 / 27) / 4, (10 / 108) / 4
    df = (la + lb) ** 2 / (la ** 2 / 3 + lb ** 2 / 3)
    half = math.exp(scipy.stats.t.ppf(0.975, df) * math.sqrt(la + lb))
    assert t["rel_lift_ci_lower"] == pytest.approx(2 / half - 1, rel=1e-9)
    assert t["rel_lift_ci_upper"] == pytest.approx(2 * half - 1, rel=1e-9)
    assert a.decisions == {"treatment": "no_difference"}  # p = 0.059 > 0.05


def test_revenue_is_winsorised_at_the_purchasers_quantile() -> None:
    # 99 purchasers of 10 and one of 10,000 in control, none in treatment; the 0.99 quantile
    # of the 100 purchasers' revenue (linear interpolation) is 10 + 0.01 x 9,990 = 109.9
    data = table(users("control", 99, revenue=10.0) + users("control", 1, start=99,
                                                            revenue=10_000.0)
                 + users("control", 100, start=100)
                 + users("treatment", 150) + users("treatment", 50, start=150, clicks=1))
    a = ea.analyse(data, HALF, min_users_per_arm=2, winsor_quantile=0.99,
                   decision_metric="revenue_per_user")
    rows = {(r["arm"], r["metric"]): r for r in a.rows}
    raw, capped = rows[("control", "revenue_per_user")], \
        rows[("control", "revenue_per_user_winsorised")]
    assert raw["value"] == pytest.approx((990 + 10_000) / 200)
    assert capped["winsor_cap"] == pytest.approx(109.9)
    assert capped["value"] == pytest.approx((990 + 109.9) / 200)
    assert rows[("treatment", "revenue_per_user_winsorised")]["value"] == 0.0
    # the decision reads the winsorised mean: 0 against 5.5 from 100 of 200 users
    assert a.decisions == {"treatment": "worse"}


def test_fixed_horizon_collects_until_every_arm_has_its_users() -> None:
    data = table(users("control", 40) + users("control", 10, clicks=1, start=40)
                 + users("treatment", 10) + users("treatment", 30, clicks=1, start=10))
    a = ea.analyse(data, HALF, min_users_per_arm=50)
    assert a.status == "collecting" and a.decisions == {}
    b = ea.analyse(data, HALF, min_users_per_arm=40)
    assert b.status == "decided" and b.decisions == {"treatment": "better"}
    kept = ea.analyse(data, HALF, min_users_per_arm=40, frozen={"treatment": "no_difference"})
    assert kept.decisions == {"treatment": "no_difference"}


def test_bad_arguments_are_one_clear_error() -> None:
    from spark_jobs.cli import JobError

    data = table(users("control", 5) + users("treatment", 5))
    with pytest.raises(JobError, match="at least two arms"):
        ea.analyse(data, HALF[:1])
    with pytest.raises(JobError, match="experiments.decision_metric"):
        ea.analyse(data, HALF, decision_metric="ndcg")


# --------------------------------------------------------------------------- per user

T0 = datetime(2026, 11, 20, 10, tzinfo=UTC)


def imp_row(rec: str, user: str | None, arm: str, ts: datetime, exp: str = "e1",
            items: tuple[str, ...] = ("A", "B")) -> dict[str, Any]:
    return {"recommendation_id": rec, "tenant": "", "surface": "recommend", "user_id": user,
            "anchor_item_id": None,
            "items": [{"item_id": i, "position": p, "score": 1.0} for p, i in enumerate(items)],
            "model_version": "v1", "strategy": "personalised", "experiment_id": exp,
            "arm": arm, "context": "{}", "ts": ts, "impression_date": ts.date()}


def att_row(eid: str, rec: str, user: str, item: str, etype: str, arm: str, ts: datetime,
            revenue: float | None = None, exp: str = "e1") -> dict[str, Any]:
    return {"event_id": eid, "tenant": "", "user_id": user, "item_id": item,
            "event_type": etype, "ts": ts, "recommendation_id": rec, "rule": "window",
            "position": 0, "model_version": "v1", "strategy": "personalised",
            "experiment_id": exp, "arm": arm, "surface": "recommend", "impression_ts": ts,
            "revenue": revenue, "event_date": ts.date()}


def test_per_user_table_counts_lists_and_what_they_earned(impressions_spec: Any) -> None:
    imps = pa.Table.from_pylist([
        imp_row("r1", "u1", "control", T0), imp_row("r2", "u1", "control", T0),
        imp_row("r3", "u2", "treatment", T0),
        imp_row("r4", "u3", "control", T0), imp_row("r5", "u3", "treatment", T0),  # crossed
        imp_row("r6", "u4", "control", T0, exp="other"),      # another experiment
        imp_row("r7", None, "control", T0),                   # anonymous
        imp_row("r8", "u5", "control", T0 - timedelta(days=3)),  # before the start
    ], schema=impressions_spec.schema)
    earned = pa.Table.from_pylist([
        att_row("e1", "r1", "u1", "A", "click", "control", T0),
        att_row("e2", "r1", "u1", "A", "click", "control", T0),   # same pair: one click
        att_row("e3", "r2", "u1", "A", "click", "control", T0),   # another list: counts
        att_row("e4", "r2", "u1", "B", "purchase", "control", T0, revenue=7.0),
        att_row("e5", "r3", "u2", "B", "purchase", "treatment", T0, revenue=None),
        att_row("e6", "r6", "u4", "A", "click", "control", T0, exp="other"),
    ], schema=schemas.GOLD_ATTRIBUTED_EVENTS.schema)
    t, crossed = ea.per_user_table(imps, earned, "e1", start=T0 - timedelta(days=1))
    assert crossed == 1
    assert t.to_pylist() == [
        {"user_id": "u1", "arm": "control", "impressions": 2, "clicks": 2, "purchases": 1,
         "purchaser": 1, "revenue": 7.0},
        {"user_id": "u2", "arm": "treatment", "impressions": 1, "clicks": 0, "purchases": 1,
         "purchaser": 1, "revenue": 0.0},
    ]


# --------------------------------------------------------------------------- the job


def test_job_writes_results_and_keeps_the_decision_made_at_the_horizon(
        tmp_path: Any, impressions_spec: Any) -> None:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")},
        "experiments": {"min_users_per_arm": 30}})
    lake = Lake.from_settings(settings.lake)
    exp = ExperimentSpec("e1", HALF, "homepage", started_at=T0 - timedelta(hours=1))
    day1, day2 = T0.date(), T0.date() + timedelta(days=1)
    imps, earned = [], []
    for i in range(40):  # day 1: a quarter of control's users click, 3/4 of treatment's
        for arm in ("control", "treatment"):
            rec = f"d1-{arm}-{i}"
            imps.append(imp_row(rec, f"{arm}{i}", arm, T0))
            if (i % 4 == 0) == (arm == "control"):
                earned.append(att_row(f"x{rec}", rec, f"{arm}{i}", "A", "click", arm, T0))
    lake.append("bronze_impressions", pa.Table.from_pylist(imps, schema=impressions_spec.schema))
    lake.append("gold_attributed_events",
                pa.Table.from_pylist(earned, schema=schemas.GOLD_ATTRIBUTED_EVENTS.schema))
    first = ea.run(settings, as_of=day1, experiments=[exp])
    assert first["experiments"]["e1"]["status"] == "decided"
    assert first["experiments"]["e1"]["decisions"] == {"treatment": "better"}
    assert first["rows"] == 2 * len(ea.METRICS)

    # day 2: the control's users click far more; the day-1 decision stands (no peeking)
    imps2, earned2 = [], []
    for i in range(40):
        rec = f"d2-control-{i}"
        imps2.append(imp_row(rec, f"control{i}", "control", T0 + timedelta(days=1)))
        for n, item in enumerate(("A", "B")):
            earned2.append(att_row(f"y{rec}{n}", rec, f"control{i}", item, "click", "control",
                                   T0 + timedelta(days=1)))
    lake.append("bronze_impressions",
                pa.Table.from_pylist(imps2, schema=impressions_spec.schema))
    lake.append("gold_attributed_events",
                pa.Table.from_pylist(earned2, schema=schemas.GOLD_ATTRIBUTED_EVENTS.schema))
    second = ea.run(settings, as_of=day2, experiments=[exp])
    assert second["experiments"]["e1"]["decisions"] == {"treatment": "better"}
    again = ea.run(settings, as_of=day2, experiments=[exp])  # a rerun overwrites its own
    assert again["rows"] == second["rows"]

    results = lake.read("experiment_results").to_pylist()
    assert len(results) == 2 * 2 * len(ea.METRICS)
    ctr = {(r["as_of"], r["arm"]): r for r in results if r["metric"] == "ctr"}
    assert ctr[(day1, "treatment")]["value"] == pytest.approx(0.75)
    assert ctr[(day1, "control")]["value"] == pytest.approx(0.25)
    # day 2: control 10 + 80 clicks on 80 lists; treatment unchanged: the lift turned
    assert ctr[(day2, "control")]["value"] == pytest.approx(90 / 80)
    assert ctr[(day2, "treatment")]["rel_lift"] == pytest.approx(0.75 / (90 / 80) - 1)
    assert {r["decided_on"] for r in results} == {day1}
    assert {(r["as_of"], r["decision"]) for r in results if r["arm"] == "treatment"} == \
        {(day1, "better"), (day2, "better")}
    assert {r["experiment_name"] for r in results} == {"homepage"}
    assert all(r["srm_pvalue"] == pytest.approx(1.0) for r in results)


def test_job_without_experiments_writes_nothing(tmp_path: Any, impressions_spec: Any) -> None:
    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")}})
    out = ea.run(settings, as_of=date(2026, 11, 20), experiments=[])
    assert out["experiments"] == {} and out["rows"] == 0
    assert Lake.from_settings(settings.lake).count("experiment_results") == 0


def test_the_job_reads_the_experiments_store(tmp_path: Any, impressions_spec: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Without `experiments=`: the experiments of `lake.experiments` that ran on the day;
    an unknown `--experiment` is one line and exit 2."""
    from lake.experiments import ExperimentStore, experiments_file, new_experiment

    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")}})
    store = ExperimentStore(experiments_file(settings))
    old = store.create(new_experiment("old", [{"name": "a", "share": 0.5},
                                              {"name": "b", "share": 0.5}],
                                      now=T0 - timedelta(days=10)))
    store.stop(old.experiment_id, now=T0 - timedelta(days=9))
    now = store.create(new_experiment("now", [{"name": "a", "share": 0.3},
                                              {"name": "b", "share": 0.7}], now=T0))
    found = ea.experiments_to_analyse(T0.date(), None, settings)
    assert [(e.experiment_id, e.arms) for e in found] == [
        (now.experiment_id, (Arm("a", 0.3), Arm("b", 0.7)))]
    assert [e.experiment_id for e in ea.experiments_to_analyse(
        T0.date() - timedelta(days=9), None, settings)] == [old.experiment_id]
    out = ea.run(settings, as_of=T0.date())
    assert list(out["experiments"]) == [now.experiment_id]
    assert out["experiments"][now.experiment_id]["status"] == "collecting"  # nobody yet

    config = tmp_path / "config.yaml"
    config.write_text(f"lake:\n  root: {tmp_path / 'lake'}\n")
    assert ea.main(["--config", str(config), "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spark_jobs.experiment_analysis: error: unknown experiment 'nope'")
    assert err.count("\n") == 1
