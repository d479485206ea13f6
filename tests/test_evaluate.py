"""Splits, baselines, staging and the train/evaluate jobs on a tiny lake."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from lake.config import load_settings
from lake.foldin import FoldInParams
from lake.strength import StrengthParams
from spark_jobs import evaluate, train
from spark_jobs.baselines import cooccurrence, ease_weights, popularity
from spark_jobs.cli import JobError
from spark_jobs.event_log import event_log_from_table, holdout, sorted_codes
from spark_jobs.matrix import build_matrix, read_gold
from spark_jobs.splits import random_split, user_time_split
from spark_jobs.staging import (
    StagingError,
    TrainedModel,
    load_metrics,
    load_staged,
    save_staged,
)

AS_OF = date(2024, 3, 31)


# -- matrix ----------------------------------------------------------------------------
def test_build_matrix_sorted_maps_and_summed_duplicates():
    b1 = pa.record_batch({"user_id": ["b", "a", "b"], "item_id": ["y", "x", "y"],
                          "confidence": [1.0, 2.0, 3.0]})
    b2 = pa.table({"user_id": ["a", "c", None], "item_id": ["z", "x", "x"],
                   "confidence": [0.5, 0.0, 1.0]})  # zero strength and null id dropped
    m = build_matrix([b1, b2])
    assert m.user_ids.tolist() == ["a", "b"]
    assert m.item_ids.tolist() == ["x", "y", "z"]
    assert m.csr.toarray().tolist() == [[2.0, 0.0, 0.5], [0.0, 4.0, 0.0]]
    assert m.user_index(["b", "nope"]).tolist() == [1, -1]


# -- splits ----------------------------------------------------------------------------
def test_random_split_per_user_fraction_disjoint_and_seeded():
    x = sp.csr_matrix(np.ones((5, 20)))
    x[4, 1:] = 0  # a one-item user stays in train
    x.eliminate_zeros()
    s = random_split(x, 0.1, seed=1)
    assert (s.train + s.test - x).nnz == 0
    assert s.train.multiply(s.test).nnz == 0
    assert np.diff(s.test.indptr).tolist() == [2, 2, 2, 2, 0]
    again = random_split(x, 0.1, seed=1)
    assert (again.test != s.test).nnz == 0
    assert (random_split(x, 0.1, seed=2).test != s.test).nnz > 0


def test_user_time_split_known_answer():
    # u0: 10 items first touched at t = 1..10 -> its last 2 are test; u1: 3 items < min 5;
    # u2: 5 items all at t = 5 (a bulk import) -> the tie would take them all: not tested;
    # u3: 6 items, the 5th and 6th tied at t = 9 -> round(1.2) = 1, the tie makes it 2
    r = [0] * 10 + [1] * 3 + [2] * 5 + [3] * 6
    c = list(range(10)) + [0, 1, 2] + [0, 1, 2, 3, 4] + [0, 1, 2, 3, 4, 5]
    t = list(range(1, 11)) + [1, 2, 3] + [5] * 5 + [1, 2, 3, 4, 9, 9]
    first = sp.csr_matrix((np.array(t, float), (r, c)), shape=(4, 10))
    s = user_time_split(first, 0.2, 5)
    test = {(int(u), int(i)) for u, i in zip(*s.test.nonzero(), strict=True)}
    assert test == {(0, 8), (0, 9), (3, 4), (3, 5)}
    assert s.train.nnz == first.nnz - 4 and s.train.multiply(s.test).nnz == 0


def test_sorted_codes_are_numpys_unique_with_inverse():
    # code-point order, as numpy sorts str: digits < upper < lower < accented letters
    ids = pa.chunked_array([["b", "é", "a", "Z"], ["b", "10", "9", "a", "ü"]])
    distinct, codes = sorted_codes(ids)
    assert distinct.tolist() == ["10", "9", "Z", "a", "b", "é", "ü"]
    assert distinct.dtype.kind == "U"
    assert codes.tolist() == [4, 5, 3, 2, 4, 0, 1, 3, 6]
    empty, none = sorted_codes(pa.array([], pa.string()))
    assert empty.size == 0 and none.size == 0
    with pytest.raises(JobError, match="1 events without an id"):
        sorted_codes(pa.array(["a", None]))


def test_event_log_rows_are_codes_in_time_order_per_user():
    table = pa.table({
        "user_id": ["u2", "u1", "u2", "u1"],
        "item_id": ["b", "c", "a", "b"],
        "event_type": ["view", "purchase", "view", "cart"],
        "value": pa.array([None, 12.5, None, None], pa.float64()),
        "ts": pa.array([datetime(2024, 1, d, tzinfo=UTC) for d in (3, 2, 1, 4)],
                       pa.timestamp("us", tz="UTC")),
    })
    log = event_log_from_table(table)
    assert log.user_ids.tolist() == ["u1", "u2"] and log.item_ids.tolist() == ["a", "b", "c"]
    assert log.user.tolist() == [0, 0, 1, 1]
    assert log.item.tolist() == [2, 1, 0, 1]
    assert log.event_type.tolist() == ["purchase", "cart", "view", "view"]
    assert np.isnan(log.value[[1, 2, 3]]).all() and log.value[0] == 12.5


def test_holdout_drops_every_event_of_a_test_pair():
    # u1 touches a (t=1), b (t=2), c (t=3), d (t=4), e (t=5) and a again at t=6: the last
    # item by FIRST touch is e; a's late re-touch does not make it a test item
    table = pa.table({
        "user_id": ["u1"] * 6 + ["u2"],
        "item_id": ["a", "b", "c", "d", "e", "a", "a"],
        "event_type": ["view"] * 7,
        "value": pa.array([None] * 7, pa.float64()),
        "ts": pa.array([datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2, 3, 4, 5, 6, 1)],
                       pa.timestamp("us", tz="UTC")),
    })
    log = event_log_from_table(table)
    h = holdout(log, "user_time", 0.2, 5, seed=0)
    test = {(log.user_ids[u], log.item_ids[i]) for u, i in zip(*h.test.nonzero(), strict=True)}
    assert test == {("u1", "e")}
    kept = {(log.user_ids[u], log.item_ids[i]) for u, i in
            zip(log.user[h.train_events], log.item[h.train_events], strict=True)}
    assert ("u1", "e") not in kept and ("u1", "a") in kept and ("u2", "a") in kept
    assert int(h.train_events.sum()) == 6
    params = StrengthParams({"view": 1.0}, half_life_days=None)
    m = log.matrix(params, h.train_events)
    assert m[list(log.user_ids).index("u1"), list(log.item_ids).index("a")] == 2.0


# -- baselines ---------------------------------------------------------------------------
def test_ease_closed_form_known_answer():
    # X = [[1,1],[1,0]], lambda = 1: P = inv([[3,1],[1,2]]) = [[2,-1],[-1,3]] / 5
    # B_ij = -P_ij / P_jj: B_01 = 1/3, B_10 = 1/2, diag 0
    b = ease_weights(sp.csr_matrix(np.array([[1.0, 1.0], [1.0, 0.0]])), 1.0)
    np.testing.assert_allclose(b, [[0.0, 1 / 3], [1 / 2, 0.0]], rtol=1e-6)


def test_cooccurrence_counts_users_per_item_pair_over_row_blocks():
    rng = np.random.default_rng(4)
    dense = np.where(rng.random((50, 6)) < 0.4, rng.integers(1, 9, (50, 6)), 0).astype(float)
    binary = (dense > 0).astype(float)
    expected = binary.T @ binary  # e.g. [j, j]: users with item j
    for block_bytes in (4 * 6 * 7, 32 << 20):  # 7 rows a block (8 blocks), or one block
        got = cooccurrence(sp.csr_matrix(dense), block_bytes=block_bytes)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, expected)
    assert np.diag(expected).tolist() == binary.sum(axis=0).tolist()


def test_popularity_counts_users():
    x = sp.csr_matrix(np.array([[5.0, 0, 1], [1, 0, 0], [2, 0, 0]]))
    assert popularity(x).tolist() == [3.0, 0.0, 1.0]


# -- staging ---------------------------------------------------------------------------
def test_staging_round_trip_and_overwrite(tmp_path):
    ui = sp.csr_matrix(np.array([[1.0, 0, 2.5], [0, 3.0, 0]]))
    m = TrainedModel("v1", "implicit", AS_OF, {"factors": 2},
                     FoldInParams.for_backend("implicit", alpha=2.0, regularization=0.5),
                     np.array(["u1", "u2"]), np.array(["a", "b", "c"]),
                     np.ones((2, 2)), np.arange(6.0).reshape(3, 2), ui, np.array([1.0, 3, 2.5]))
    path = save_staged(tmp_path, m)
    assert path == tmp_path / "staging" / "v1"
    m.item_factors[:] = 7.0
    save_staged(tmp_path, m)
    got = load_staged(tmp_path, "v1")
    assert got.as_of == AS_OF and got.foldin == m.foldin and got.params == {"factors": 2}
    assert got.user_ids.tolist() == ["u1", "u2"] and got.item_factors.dtype == np.float32
    assert (got.item_factors == 7.0).all()
    assert (got.user_items != ui).nnz == 0
    with pytest.raises(StagingError, match="no staged model"):
        load_staged(tmp_path, "nope")
    with pytest.raises(StagingError, match="shape"):
        TrainedModel("v2", "implicit", None, {}, m.foldin, m.user_ids, m.item_ids,
                     np.ones((3, 2)), m.item_factors, ui, m.item_popularity)


# -- jobs on a tiny lake -------------------------------------------------------------------
def block_events(as_of: date, seed: int = 0) -> list[tuple[str, str, float, datetime]]:
    """4 taste blocks of 25 users x 15 items; each user touched ~70% of their block, one
    item every 3 days up to the evening of `as_of`."""
    rng = np.random.default_rng(seed)
    rows = []
    end = datetime(as_of.year, as_of.month, as_of.day, 20, tzinfo=UTC)
    for u in range(100):
        block = u // 25
        items = [i for i in range(block * 15, block * 15 + 15) if rng.random() < 0.7]
        for n, i in enumerate(rng.permutation(items)):
            rows.append((f"user{u:03d}", f"item{i:03d}", float(rng.integers(1, 5)),
                         end - timedelta(days=int(n) * 3)))
    return rows


def block_gold(as_of: date, seed: int = 0) -> pa.Table:
    u, i, c, ts = zip(*block_events(as_of, seed), strict=True)
    return pa.table({"user_id": u, "item_id": i, "confidence": c, "n_events": [1] * len(u),
                     "last_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                     "as_of": [as_of] * len(u)})


def block_silver(as_of: date) -> pa.Table:
    rows = block_events(as_of)
    return pa.Table.from_pylist([
        {"event_id": f"e{n}", "user_id": u, "item_id": i, "event_type": "view", "value": None,
         "ts": ts, "received_at": ts} for n, (u, i, _, ts) in enumerate(rows)])


@pytest.fixture
def settings(tmp_path, lake):
    lake.overwrite("gold_interactions", block_gold(AS_OF), partitions=[{"as_of": AS_OF}])
    lake.append("silver_events", block_silver(AS_OF))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "lake": {"root": str(lake.root)},
        "model": {"dir": str(tmp_path / "models")},
        "train": {"factors": 8, "regularization": 0.5, "iterations": 10, "alpha": 2.0},
        "evaluate": {"k": [5, 10], "test_fraction": 0.2, "bootstrap": 200},
    }))
    return cfg


def test_read_gold_partition(settings, lake):
    other = date(2024, 3, 1)
    lake.overwrite("gold_interactions", block_gold(other, seed=5).slice(0, 10),
                   partitions=[{"as_of": other}])
    assert read_gold(lake, other).nnz == 10
    assert read_gold(lake, AS_OF).nnz == block_gold(AS_OF).num_rows


@pytest.mark.parametrize("split", ["random", "user_time"])
def test_train_then_evaluate_jobs(settings, tmp_path, capsys, split):
    assert train.main(["--config", str(settings), "--as-of", "2024-03-31", "--version", "v1",
                       "--factors", "6"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == "v1" and out["users"] == 100 and out["factors"] == 6
    staged = load_staged(tmp_path / "models", "v1")
    assert staged.params["factors"] == 6 and staged.backend == "implicit"
    assert staged.params["recipe"]["train"]["factors"] == 6

    assert evaluate.main(["--config", str(settings), "--as-of", "2024-03-31", "--version",
                          "v1", "--split", split]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = load_metrics(tmp_path / "models", "v1")
    assert metrics["split"] == split and metrics["k"] == [5, 10]
    assert set(metrics["models"]) == {"als", "popularity", "ease"}
    assert metrics["n_test_users"] == out["n_test_users"] > 50
    for name in ("als", "popularity", "ease"):
        for key in ("ndcg@10", "recall@10", "map@10", "coverage@10", "ndcg@5"):
            assert 0.0 <= metrics["models"][name][key] <= 1.0
        lo, hi = metrics["intervals"]["models"][name]["ndcg@10"]
        assert lo <= metrics["models"][name]["ndcg@10"] <= hi
    # block structure: ALS must clearly beat popularity (which ignores the blocks)
    als, pop = metrics["models"]["als"]["ndcg@10"], metrics["models"]["popularity"]["ndcg@10"]
    assert als > 1.5 * pop
    diff = metrics["intervals"]["vs_popularity"]["ndcg@10"]
    assert diff["diff"] == pytest.approx(als - pop) and diff["ci"][0] > 0
    report = tmp_path / "models" / "reports" / "v1"
    assert metrics["report"] == str(report / "report.md")
    text = (report / "report.md").read_text()
    assert "| als |" in text and "| ease |" in text and "als - popularity (paired)" in text
    assert (report / "metrics_vs_k.png").stat().st_size > 1000
    assert (report / "popularity_deciles.png").stat().st_size > 1000


def test_evaluate_unknown_version_is_a_user_error(settings, capsys):
    assert evaluate.main(["--config", str(settings), "--as-of", "2024-03-31",
                          "--version", "nope"]) == 2
    assert "no staged model" in capsys.readouterr().err


def test_train_without_gold_rows_for_the_date(settings, capsys):
    assert train.main(["--config", str(settings), "--as-of", "2020-01-01",
                       "--version", "v0"]) == 2
    assert "no rows" in capsys.readouterr().err


def test_itemknn_replaces_ease_above_max_items(settings, tmp_path):
    s = load_settings(settings, overrides={"evaluate": {"ease_max_items": 10,
                                                        "split": "random"}})
    train.run(s, as_of=AS_OF, version="v2")
    res = evaluate.run(s, as_of=AS_OF, version="v2")
    metrics = load_metrics(s.model.dir, "v2")
    assert "ease" not in metrics["models"] and "ease" not in res["ndcg@10"]
    assert "ease_skipped" in metrics["facts"]
    # item-kNN sees the blocks too: far above popularity
    knn = metrics["models"]["itemknn"]["ndcg@10"]
    assert knn > 1.5 * metrics["models"]["popularity"]["ndcg@10"]


def test_evaluation_scores_the_shipped_item_factors_when_few_pairs_are_held_out(settings):
    # 40 scored users: their held-out pairs are a small share of all pairs only at scale, so
    # the test allows any share; the default (0.05) keeps refitting on this tiny lake
    few = {"reuse_fit_max_share": 1.0, "max_eval_users": 40, "min_test_users": 10}
    s = load_settings(settings, overrides={"evaluate": few})
    train.run(s, as_of=AS_OF, version="vr")  # the DAG's task: it samples from the lake
    held = load_staged(s.model.dir, "vr").info["eval_held_out"]
    assert held["users"] == 40 and held["pairs"] > 40 and 0 < held["share"] < 0.2
    evaluate.run(s, as_of=AS_OF, version="vr")
    metrics = load_metrics(s.model.dir, "vr")
    assert metrics["facts"]["als_protocol"].startswith("the staged item factors")
    assert metrics["n_test_users"] == 40
    als, pop = metrics["models"]["als"]["ndcg@10"], metrics["models"]["popularity"]["ndcg@10"]
    assert als > 1.5 * pop  # the blocks, learnt without the scored users' held-out pairs
    report = (s.model.dir / "reports" / "vr" / "report.md").read_text()
    assert f"its fit left out the {held['pairs']} held-out pairs" in report

    # another holdout holds out other pairs: the staged fit saw them, so the evaluation refits
    other = load_settings(settings, overrides={"evaluate": few | {"test_fraction": 0.3}})
    evaluate.run(other, as_of=AS_OF, version="vr")
    assert load_metrics(s.model.dir, "vr")["facts"]["als_protocol"] == \
        "refit on the training events (the staged fit left out other pairs than this holdout's)"

    train.run(load_settings(settings), as_of=AS_OF, version="vd")  # ~20% held out: no
    assert "eval_held_out" not in load_staged(s.model.dir, "vd").info


@pytest.mark.slow
def test_train_job_with_mllib_reads_gold_through_spark(settings, tmp_path, spark):
    s = load_settings(settings, overrides={"train": {"backend": "mllib", "iterations": 4}})
    out = train.run(s, as_of=AS_OF, version="vm", spark=spark)
    assert out["backend"] == "mllib" and out["users"] == 100
    m = load_staged(s.model.dir, "vm")
    assert m.foldin.reg_exponent == 1.0 and m.foldin.confidence_offset == 1.0
    assert np.abs(m.user_factors).sum(axis=1).min() > 0  # every user got a trained vector
    assert np.abs(m.item_factors).sum(axis=1).min() > 0


def test_baseline_results_are_scored_once_per_input(settings, tmp_path):
    s = load_settings(settings)
    train.run(s, as_of=AS_OF, version="v3")
    first = evaluate.run(s, as_of=AS_OF, version="v3")
    m1 = load_metrics(s.model.dir, "v3")
    assert first["baselines_cached"] is False and m1["facts"]["baselines_cached"] is False
    cached = list((tmp_path / "models" / "cache" / "baselines").glob("*.npz"))
    assert [p.stem for p in cached] == [m1["facts"]["baselines_key"]]

    again = evaluate.run(s, as_of=AS_OF, version="v3")  # a rerun: same data, same holdout
    m2 = load_metrics(s.model.dir, "v3")
    assert again["baselines_cached"] is True
    for name in ("popularity", "ease"):
        assert m2["models"][name] == m1["models"][name]
        assert m2["intervals"]["models"][name] == m1["intervals"]["models"][name]
    assert m2["intervals"]["vs_popularity"] == m1["intervals"]["vs_popularity"]
    assert "read from the cache" in (tmp_path / "models" / "reports" / "v3" /
                                     "report.md").read_text()

    # another EASE lambda is another answer: scored again
    other = load_settings(settings, overrides={"evaluate": {"ease_lambda": 10.0}})
    assert evaluate.run(other, as_of=AS_OF, version="v3")["baselines_cached"] is False


def test_baseline_fingerprint_sees_pairs_users_and_cutoffs_not_strengths():
    from lake.config import EvaluateSettings
    from spark_jobs.baseline_cache import fingerprint

    ev = EvaluateSettings()
    x = sp.csr_matrix(np.array([[1.0, 0, 2], [0, 3, 0], [4, 0, 0]]))
    test = sp.csr_matrix(np.array([[0, 1.0, 0], [1, 0, 0], [0, 1, 0]]))
    users = np.array([0, 1, 2])
    key = fingerprint(x, test, users, [10], ev)
    assert fingerprint(x * 7.5, test, users, [10], ev) == key  # strengths: unused
    fewer = x.tolil()
    fewer[0, 2] = 0
    assert fingerprint(sp.csr_matrix(fewer), test, users, [10], ev) != key
    assert fingerprint(x, test, users[:2], [10], ev) != key
    assert fingerprint(x, test, users, [5, 10], ev) != key
    assert fingerprint(x, test.T.tocsr(), users, [10], ev) != key


def test_the_number_of_evaluated_users_shrinks_as_the_catalogue_grows() -> None:
    from lake.config import EvaluateSettings
    from spark_jobs.eval_sample import eval_user_limit

    ev = EvaluateSettings(max_eval_users=20_000, max_eval_cells=100_000_000, min_test_users=50)
    assert eval_user_limit(ev, 3_706) == 20_000        # MovieLens-1M: the user cap binds
    assert eval_user_limit(ev, 20_000) == 5_000        # 10^8 cells / 20k items
    assert eval_user_limit(ev, 10_000_000) == 50       # never below the gate's minimum


def test_user_time_order_is_lexsort_by_user_then_time_ties_in_input_order() -> None:
    from spark_jobs.event_log import user_time_order

    rng = np.random.default_rng(4)
    user = rng.integers(0, 50, 5_000)
    ts_us = 1_700_000_000_000_000 + rng.integers(0, 40, 5_000) * 1_000_000  # many ties
    np.testing.assert_array_equal(user_time_order(user, ts_us, 50), np.lexsort((ts_us, user)))
    # a span x users too wide for one int64 key: lexsort itself
    wide = ts_us.copy()
    wide[0] = 0
    np.testing.assert_array_equal(user_time_order(user, wide, 2**45), np.lexsort((wide, user)))
    assert user_time_order(user[:0], ts_us[:0], 50).size == 0
