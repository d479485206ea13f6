"""The simulated shop (bench/experiments.py): known behaviour, and the loop's figures on
the direct path: A/A false positives near the nominal 5%, A/B power, measured vs true
lift, intervals that hold the truth. Seeds are fixed, so the figures are reproducible."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bench import experiments as bx
from bench.report import Report
from bench.run import SECTIONS, _sections


@pytest.fixture(scope="module")
def shop() -> bx.Shop:
    return bx.Shop.make()


def test_the_shop_clicks_with_the_probabilities_it_states(shop: bx.Shop) -> None:
    u = 7
    taste = shop.world.users.taste[u]
    weights = shop.world.users.taste_weights[u]
    cats = shop.world.items.item_category
    fav = np.flatnonzero(cats == taste[0])[:4]   # items of the favourite category
    other = np.flatnonzero(~np.isin(cats, taste))[:4]  # of none of the user's categories
    items = np.concatenate([fav, other])[None, :]
    expected = sum(0.8 ** p * (0.01 + 0.5 * weights[0]) for p in range(4)) + \
        sum(0.8 ** p * 0.01 for p in range(4, 8))
    assert shop.expected_clicks(np.array([u]), items)[0] == pytest.approx(expected)
    # the taste ranking is better for everyone than the one popular list
    users = np.arange(200)
    assert (shop.expected_clicks(users, bx.taste_ranker(shop, users))
            >= shop.expected_clicks(users, bx.popularity_ranker(shop, users)) - 1e-12).all()


def test_simulated_clicks_match_their_expectation(shop: bx.Shop) -> None:
    """Events the simulated users send average out to the known expected clicks."""
    exp = bx.experiment("check", ["a", "b"], salt="s")
    users = np.arange(shop.n_users)
    served = bx.serve_direct(shop, exp, {"a": bx.taste_ranker, "b": bx.taste_ranker}, 2, users)
    events = bx.react(shop, served, np.random.default_rng(3))
    clicks = sum(e["event_type"] == "click" for e in events)
    expected = shop.expected_clicks(served.user, served.items).sum()
    assert clicks == pytest.approx(expected, rel=0.03)  # ~20k clicks: 3% is > 4 sigma
    explicit = sum(bool(e["recommendation_id"]) for e in events) / len(events)
    assert explicit == pytest.approx(bx.EXPLICIT_SHARE, abs=0.02)
    # the real assignment split the users about evenly
    assert abs(sum(a == "a" for a in served.arm) / len(served.arm) - 0.5) < 0.03


@pytest.mark.slow
def test_aa_false_positive_rate_is_near_the_nominal_five_percent(shop: bx.Shop) -> None:
    aa = bx.repeat(shop, bx.AA, 120, seed=300, n_users=1000)
    assert 0.01 <= aa.rate <= 0.10, aa
    assert aa.true_lift == 0.0
    assert abs(aa.measured_lift) < 0.02, aa
    assert aa.covered / aa.runs >= 0.88, aa


def test_ab_power_and_measured_vs_true_lift(shop: bx.Shop) -> None:
    ab = bx.repeat(shop, bx.AB, 20, seed=900, n_users=1000, wins=bx.better_wins)
    assert ab.rate >= 0.8, ab
    assert ab.true_lift > 0.5  # taste-aware lists earn clearly more clicks
    assert ab.measured_lift == pytest.approx(ab.true_lift, rel=0.1), ab
    assert ab.covered >= 17, ab


def test_a_one_sided_split_is_flagged_not_decided(shop: bx.Shop) -> None:
    """Lost impressions of one arm (half its users never logged) are an SRM, not a lift."""
    import pyarrow.compute as pc

    from spark_jobs.attribution import attribute_events_arrow
    from spark_jobs.experiment_analysis import analyse, per_user_table, spec_of

    rng = np.random.default_rng(5)
    exp = bx.experiment("lossy", ["control", "treatment"], salt="lossy")
    users = rng.choice(shop.n_users, 2000, replace=False)
    served = bx.serve_direct(shop, exp, bx.AA, 3, users)
    events = bx.react(shop, served, rng)
    imps = bx.impressions_table(shop, served, exp.experiment_id)
    user_no = pc.cast(pc.utf8_slice_codeunits(imps["user_id"], 1), "int64").to_numpy()
    lost = (np.asarray(served.arm) == "treatment") & (user_no % 2 == 0)
    imps = imps.filter(~lost)
    attributed = attribute_events_arrow(bx.events_table(events), imps, bx.items_table(shop),
                                        window_hours=24.0)
    per_user, _ = per_user_table(imps, attributed, exp.experiment_id)
    a = analyse(per_user, spec_of(exp).arms, min_users_per_arm=100)
    assert a.status == "invalid" and a.srm_pvalue < 1e-6 and a.decisions == {}


def test_the_bench_section_is_registered_and_prints_the_named_figures(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert "experiments" in SECTIONS
    report = Report(tmp_path)
    bx.run(report, aa_runs=4, ab_runs=2, n_users=400, server_runs=(0, 0))
    out = capsys.readouterr().out
    for name in ("experiments.aa_false_positive_rate", "experiments.ab_power",
                 "experiments.ab_measured_lift"):
        assert f'"name": "{name}"' in out
    assert callable(_sections(True, False)["experiments"])


@pytest.mark.slow
def test_through_the_real_server(shop: bx.Shop) -> None:
    """The real server (subprocess, 127.0.0.1): experiments created with the Admin API,
    RecommendBatch answers with recommendation_id and arm, events back through
    IngestEvents; after a graceful stop the batch jobs find every list and every event."""
    out = bx.server_experiments(shop, aa_runs=3, ab_runs=2, n_users=400, rounds=2)
    att = out["attribution"]
    assert att["impressions"] >= 5 * 400 * 2  # every answer recorded (+ the waits' probes)
    assert att["attributed"] == att["events"] > 0   # each event tied to the list it came from
    assert att["explicit"] == att["claimed"] > 0 and att["unattributed_claims"] == 0
    assert att["window"] > 0
    ab = out["A/B"]
    assert (ab.runs, ab.significant, ab.covered) == (2, 2, 2), ab
    assert ab.true_lift > 0.3
    assert out["A/A"].runs == 3
