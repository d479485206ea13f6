"""The tuning search: seeded and deterministic, bounded, never sees the evaluation's test."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from lake.config import load_settings
from spark_jobs.eval_sample import eval_sample
from spark_jobs.evaluate import eval_holdout, evaluate_recipe
from spark_jobs.event_log import event_log_from_table
from spark_jobs.recipe import load_recipe
from spark_jobs.splits import tuning_users
from spark_jobs.tune import BLEND_BETAS, BLEND_EVALS, BLEND_N0, search

END = datetime(2024, 3, 31, 20, tzinfo=UTC)


def block_log(seed: int = 0):
    """4 taste blocks of 30 users x 12 items, one event every 2 days; ratings as values."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(120):
        block = u // 30
        items = [i for i in range(block * 12, block * 12 + 12) if rng.random() < 0.75]
        for n, i in enumerate(rng.permutation(items)):
            rows.append((f"u{u:03d}", f"i{i:03d}", "rating", float(rng.integers(1, 6)),
                         END - timedelta(days=2 * int(n))))
    u, i, t, v, ts = zip(*rows, strict=True)
    return event_log_from_table(pa.table({
        "user_id": u, "item_id": i, "event_type": t, "value": v,
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC"))}))


def settings(seed: int = 0, max_trials: int = 9):
    return load_settings(env={}, overrides={
        "train": {"factors": 8, "iterations": 4},
        "tune": {"seed": seed, "max_trials": max_trials, "budget_s": 600},
        "evaluate": {"k": [10]},
    })


def test_search_is_deterministic_for_a_seed_and_bounded():
    log = block_log()
    s = settings()
    test = eval_holdout(log, s)
    a = search(log, s, test)
    b = search(log, s, test)
    assert len(a.trials) == 9  # max_trials bounds it
    assert [t.recipe for t in a.trials] == [t.recipe for t in b.trials]
    assert [t.metric for t in a.trials] == [t.metric for t in b.trials]
    assert a.best == b.best
    assert a.trials[0].stage == "defaults" and a.trials[0].recipe.train == s.train
    # the chosen recipe is the best trial's (plus its blend); a later trial replaces the
    # best only when it is better by more than 0.2% (smaller gains are validation noise)
    top = a.trials[0]
    for t in a.trials[1:]:
        if t.metric > top.metric * 1.002:
            top = t
    assert (a.best.train, a.best.strength) == (top.recipe.train, top.recipe.strength)
    other = search(log, settings(seed=1), test)
    assert [t.recipe for t in other.trials[1:]] != [t.recipe for t in a.trials[1:]]


def test_blend_search_is_coordinate_wise_from_the_best_trial():
    log = block_log()
    s = settings()
    res = search(log, s, eval_holdout(log, s))
    grid = res.info["blend"]["grid"]
    assert len(BLEND_BETAS) <= len(grid) <= BLEND_EVALS + 1  # n0 only when some beta > 0 won
    best_trial = max(res.trials, key=lambda t: t.metric)
    # beta = 0 is the chosen trial's own score, not a re-evaluation
    assert grid[0]["beta"] == 0.0 and grid[0]["ndcg@10"] == pytest.approx(best_trial.metric,
                                                                          rel=0.01)
    assert [g["beta"] for g in grid[:len(BLEND_BETAS)]] == list(BLEND_BETAS)
    chosen = res.info["blend"]["chosen"]
    top = max(grid, key=lambda g: g["ndcg@10"])
    assert top["ndcg@10"] == max(g["ndcg@10"] for g in grid if (g["beta"], g["n0"]) ==
                                 (chosen["beta"], chosen["n0"]))
    # the n0 pass is at one beta (the best of the first pass)
    n0_pass = grid[len(BLEND_BETAS):len(BLEND_BETAS) + len(BLEND_N0) - 1]
    assert len({g["beta"] for g in n0_pass}) <= 1


def test_budget_stops_new_trials():
    log = block_log()
    s = load_settings(env={}, overrides={"train": {"factors": 8, "iterations": 4},
                                         "tune": {"budget_s": 0.001, "max_trials": 16}})
    clock = iter(range(1000))
    res = search(log, s, eval_holdout(log, s), now=lambda: float(next(clock)))  # 1 s a reading
    assert len(res.trials) == 1  # the defaults always run; then the budget is spent


def test_search_and_evaluation_score_disjoint_users():
    log = block_log()
    s = settings()
    test = eval_holdout(log, s)
    res = search(log, s, test)
    # trials train on the evaluation's training events only: no test pair among them
    assert res.info["validation"]["candidate_events"] == int(test.train_events.sum())
    test_pairs = set(zip(*test.test.nonzero(), strict=True))
    kept = set(zip(log.user[test.train_events].tolist(), log.item[test.train_events].tolist(),
                   strict=True))
    assert test_pairs and not (test_pairs & kept)
    # the search scores the tuning users, the evaluation of a searched recipe the others
    tuned = tuning_users(log.user_ids, s.tune.validation_users, s.train.seed)
    assert res.info["validation"]["tuning_users"] == int(tuned.sum())
    assert 0 < res.info["validation_users"] <= int(tuned.sum()) < len(log.user_ids)
    recipe = res.best
    results, facts, _ = evaluate_recipe(eval_sample(log, test, recipe.strength, s, exclude=tuned),
                                        test, recipe, s)
    assert facts["excluded_tuning_users"] == int(tuned.sum())
    assert facts["n_test_users"] == len(results["als"].per_user["ndcg@10"])
    assert facts["n_test_users"] <= int((~tuned).sum())


def test_tuning_users_are_a_stable_seeded_share():
    ids = np.array([f"user-{n}" for n in range(20_000)])
    a = tuning_users(ids, 0.5, seed=7)
    assert 0.48 < a.mean() < 0.52
    assert np.array_equal(a, tuning_users(ids, 0.5, seed=7))  # deterministic
    assert not np.array_equal(a, tuning_users(ids, 0.5, seed=8))  # the seed matters
    # a user keeps its side when the log grows or is read in another order
    grown = np.concatenate([ids[::-1], np.array([f"new-{n}" for n in range(500)])])
    assert np.array_equal(tuning_users(grown, 0.5, seed=7)[:20_000], a[::-1])
    assert 0.18 < tuning_users(ids, 0.2, seed=7).mean() < 0.22
    with pytest.raises(ValueError, match="fraction"):
        tuning_users(ids, 1.0, seed=7)


def test_load_recipe_reads_the_tuned_one(tmp_path):
    s = load_settings(env={}, overrides={"model": {"dir": str(tmp_path)}})
    assert load_recipe(s, "v1").train == s.train  # no search ran: the configured recipe
    log = block_log()
    res = search(log, settings(max_trials=3), eval_holdout(log, settings(max_trials=3)))
    d = tmp_path / "staging" / "v1"
    d.mkdir(parents=True)
    (d / "tuning.json").write_text(json.dumps(res.to_dict()))
    got = load_recipe(s, "v1")
    assert got.train.factors == res.best.train.factors
    assert got.train.effective_regularization == res.best.train.effective_regularization
    assert got.strength == res.best.strength and got.blend == res.best.blend
