"""Ranking metrics against answers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from spark_jobs.metrics import (
    average_precision_at_k,
    catalogue_coverage,
    evaluate_ranking,
    hits_at,
    ndcg_at_k,
    popularity_deciles,
    recall_at_k,
    top_k,
)

L2, L3, L4 = math.log2(2), math.log2(3), math.log2(4)


def test_top_k_orders_by_score_and_breaks_ties_by_index():
    s = np.array([[0.1, 0.9, 0.5, 0.9, -1.0], [3.0, 2.0, 1.0, 0.0, 5.0]])
    assert top_k(s, 3).tolist() == [[1, 3, 2], [4, 0, 1]]
    assert top_k(s, 10).shape == (2, 5)  # k capped at n_items
    assert top_k(s, 5)[0].tolist() == [1, 3, 2, 0, 4]


def test_hand_computed_user():
    # ranking: items 7, 2, 5, 1 ; relevant {2, 1, 9} -> hits at ranks 2 and 4
    topk = np.array([[7, 2, 5, 1]])
    rel = sp.csr_matrix(([1.0, 1.0, 1.0], ([0, 0, 0], [2, 1, 9])), shape=(1, 10))
    h = hits_at(topk, rel)
    assert h.tolist() == [[False, True, False, True]]
    n = np.array([3])
    # recall@4 = 2 / min(4, 3)
    assert recall_at_k(h, n, 4)[0] == pytest.approx(2 / 3)
    # recall@2 = 1 / min(2, 3)
    assert recall_at_k(h, n, 2)[0] == pytest.approx(1 / 2)
    # ndcg@4 = (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3) + 1/log2(4))
    dcg = 1 / L3 + 1 / math.log2(5)
    idcg = 1 / L2 + 1 / L3 + 1 / L4
    assert ndcg_at_k(h, n, 4)[0] == pytest.approx(dcg / idcg)
    # AP@4 = (P@2 * 1 + P@4 * 1) / min(4, 3) = (1/2 + 2/4) / 3
    assert average_precision_at_k(h, n, 4)[0] == pytest.approx((0.5 + 0.5) / 3)


def test_perfect_and_empty_rankings():
    topk = np.array([[0, 1, 2], [3, 4, 5]])
    rel = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]]))
    rel2 = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0.0]]))
    h = hits_at(topk, rel2)
    n = np.array([2, 1])
    assert ndcg_at_k(h, n, 3).tolist() == pytest.approx([1.0, 0.0])
    assert recall_at_k(h, n, 3).tolist() == pytest.approx([1.0, 0.0])
    assert average_precision_at_k(h, n, 3).tolist() == pytest.approx([1.0, 0.0])
    assert hits_at(topk, rel)[1].sum() == 0


def test_coverage_and_deciles():
    topk = np.array([[0, 1], [0, 2], [0, 1]])
    assert catalogue_coverage(topk, 10, 2) == pytest.approx(0.3)
    assert catalogue_coverage(topk, 10, 1) == pytest.approx(0.1)
    counts = np.zeros(10)
    counts[[9, 9, 0]] = [3, 3, 1]  # fancy add: item 9 gets 3, item 0 gets 1
    pop = np.arange(10.0)  # item 9 most popular -> decile 0 ; item 0 least -> decile 9
    d = popularity_deciles(counts, pop)
    assert d[0] == pytest.approx(3 / 4) and d[9] == pytest.approx(1 / 4)
    assert d.sum() == pytest.approx(1.0)


def test_evaluate_ranking_excludes_training_items_and_averages():
    # 2 users x 4 items. Scores prefer item 0 then 1, 2, 3 for everyone.
    scores = np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32)

    def score(rows):
        return np.tile(scores, (len(rows), 1))

    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0.0]]))
    test = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1.0]]))
    res = evaluate_ranking(score, train, test, [1, 2])
    # user 0: item 0 excluded -> ranking 1,2,3 -> hit at rank 1 ; user 1: ranking 0,1 -> miss
    assert res.n_users == 2
    assert res.metrics["ndcg@1"] == pytest.approx(0.5)
    assert res.metrics["recall@2"] == pytest.approx(0.5)
    assert res.metrics["map@2"] == pytest.approx(0.5)
    # top-1 items: {1, 0} -> 2 of 4 items; top-2: {1, 2, 0} -> 3 of 4
    assert res.metrics["coverage@1"] == pytest.approx(0.5)
    assert res.metrics["coverage@2"] == pytest.approx(0.75)
    assert res.rec_counts[1].tolist() == [1, 1, 0, 0]


def test_evaluate_ranking_batches_give_the_same_answer():
    rng = np.random.default_rng(0)
    s = rng.random((50, 30)).astype(np.float32)
    train = sp.random(50, 30, density=0.2, random_state=1, format="csr")
    test = sp.random(50, 30, density=0.1, random_state=2, format="csr")
    test = (test - test.multiply(train > 0)).tocsr()
    test.eliminate_zeros()
    a = evaluate_ranking(lambda r: s[r], train, test, [5, 10], batch_size=7)
    b = evaluate_ranking(lambda r: s[r], train, test, [5, 10], batch_size=1000)
    assert a.metrics == pytest.approx(b.metrics)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_ranking(lambda r: r, sp.csr_matrix((2, 3)), sp.csr_matrix((2, 4)), [1])
    with pytest.raises(ValueError, match="cut-offs"):
        evaluate_ranking(lambda r: r, sp.csr_matrix((2, 3)), sp.csr_matrix((2, 3)), [0])


def test_top_k_of_a_large_matrix_matches_a_full_sort():
    # distinct scores so the order is unique; rows spread over the kernel's threads
    rng = np.random.default_rng(3)
    s = rng.permutation(600 * 4000).reshape(600, 4000).astype(np.float64)
    s[:, 17] = -np.inf  # an excluded (already seen) item never ranks
    expected = np.argsort(-s, axis=1, kind="stable")[:, :50]
    got = top_k(s, 50)
    assert got.shape == (600, 50)
    assert np.array_equal(got, expected)
    assert not (got == 17).any()


def test_top_k_breaks_ties_by_index_across_the_cut():
    # many equal scores (item-kNN's zeros, excluded -inf): the lowest indices fill the cut
    s = np.zeros((2, 10), dtype=np.float32)
    s[0, 7] = 1.0
    s[1, :] = -np.inf
    s[1, 9] = -0.0  # equal to 0.0, so tied with nothing else here but ranked first
    assert top_k(s, 3).tolist() == [[7, 0, 1], [9, 0, 1]]
    rng = np.random.default_rng(5)
    big = np.where(rng.random((700, 3000)) < 0.03, rng.random((700, 3000)), 0.0)
    big[:, :40] = -np.inf
    expected = np.argsort(-big, axis=1, kind="stable")[:, :30]
    assert np.array_equal(top_k(big.astype(np.float32), 30), expected)


def test_top_k_matches_a_stable_sort_on_few_distinct_values_nan_and_every_k():
    rng = np.random.default_rng(11)
    s = rng.integers(-2, 3, (40, 60)).astype(np.float32)
    s[rng.random(s.shape) < 0.1] = np.nan  # ranks as -inf: after every real score
    s[rng.random(s.shape) < 0.1] = -np.inf
    ranked = np.where(np.isnan(s), -np.inf, s)
    expected = np.argsort(-ranked, axis=1, kind="stable")
    for k in (1, 2, 7, 59, 60, 61):
        assert np.array_equal(top_k(s, k), expected[:, :k]), k
    assert top_k(s, 0).shape == (40, 0)
    assert top_k(np.empty((0, 5), np.float32), 3).shape == (0, 3)
