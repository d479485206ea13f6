"""The evaluation's sample left out of the production fit (`spark_jobs.eval_sample`)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lake.config import load_settings
from lake.foldin import FoldInParams, fold_in, gramian
from spark_jobs.als import make_trainer
from spark_jobs.eval_sample import EvalSample, leave_out, staged_factors
from spark_jobs.matrix import InteractionMatrix
from spark_jobs.train import fit_for_evaluation


def sample_of(users: list[str], items: list[str], total_pairs: int) -> EvalSample:
    """A sample whose held-out pairs are (users[n], items[n]); codes are not used here."""
    return EvalSample(users=np.arange(len(set(users))), train=sp.csr_matrix((1, 1)),
                      item_ids=np.array(["x"]),
                      held_user_ids=np.array(users), held_item_ids=np.array(items),
                      total_pairs=total_pairs, excluded_tuning_users=0)


def block_matrix(n_users: int = 60, n_items: int = 24, seed: int = 0) -> InteractionMatrix:
    """3 taste blocks; each user touched ~60% of their block with strengths 1..4."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n_users, n_items))
    per = n_items // 3
    for u in range(n_users):
        block = u % 3
        cols = np.arange(block * per, (block + 1) * per)
        hit = cols[rng.random(per) < 0.6]
        dense[u, hit] = rng.integers(1, 5, size=hit.size)
    return InteractionMatrix(np.array([f"u{u:02d}" for u in range(n_users)]),
                             np.array([f"i{i:02d}" for i in range(n_items)]),
                             sp.csr_matrix(dense))


def test_leave_out_removes_exactly_the_held_out_pairs() -> None:
    dense = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0], [5.0, 6.0, 7.0]])
    m = InteractionMatrix(np.array(["a", "b", "c"]), np.array(["x", "y", "z"]),
                          sp.csr_matrix(dense))
    kept = leave_out(m, sample_of(["a", "c", "c"], ["y", "x", "z"], 7))
    assert kept is not None and kept.nnz == 4
    np.testing.assert_array_equal(kept.toarray(), [[1, 0, 0], [3, 0, 4], [0, 6, 0]])
    np.testing.assert_array_equal(m.csr.toarray(), dense)  # the input is untouched
    # a pair whose user or item gold does not know: nothing is left out (the evaluation refits)
    assert leave_out(m, sample_of(["a", "d"], ["y", "x"], 7)) is None
    assert leave_out(m, sample_of(["a"], ["w"], 7)) is None


def test_the_fingerprint_names_the_pairs() -> None:
    a = sample_of(["a", "c"], ["y", "x"], 7)
    assert a.fingerprint == sample_of(["a", "c"], ["y", "x"], 9).fingerprint
    assert a.fingerprint != sample_of(["a", "c"], ["x", "y"], 7).fingerprint
    assert a.fingerprint != sample_of(["a"], ["y"], 7).fingerprint
    assert a.held_share == pytest.approx(2 / 7)


@pytest.mark.parametrize("backend", ["ials", "implicit"])
def test_the_fit_leaves_the_pairs_out_and_serves_their_users_on_all_pairs(backend) -> None:
    m = block_matrix()
    s = load_settings(env={}, overrides={"train": {"backend": backend, "factors": 6,
                                                   "iterations": 6, "regularization": 0.5,
                                                   "alpha": 2.0}})
    trainer = make_trainer(s.train)
    # two pairs of u03 and one of u10 held out: 3 of m.nnz pairs
    r3, r10 = m.csr[3].indices, m.csr[10].indices
    held = [("u03", m.item_ids[r3[0]]), ("u03", m.item_ids[r3[1]]), ("u10", m.item_ids[r10[2]])]
    sample = sample_of([u for u, _ in held], [i for _, i in held], m.nnz)

    result, record = fit_for_evaluation(trainer, m, sample, max_share=0.05)
    assert record is not None
    assert record["pairs"] == 3 and record["users"] == 2
    assert record["fingerprint"] == sample.fingerprint
    # the item factors are those of a fit without the three pairs (zeroed by hand here)
    dense = m.csr.toarray()
    dense[3, r3[:2]] = 0.0
    dense[10, r10[2]] = 0.0
    alone = trainer.fit(InteractionMatrix(m.user_ids, m.item_ids, sp.csr_matrix(dense)))
    np.testing.assert_allclose(result.item_factors, alone.item_factors, rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(m.shape[0]), [3, 10])
    np.testing.assert_allclose(result.user_factors[others], alone.user_factors[others],
                               rtol=1e-4, atol=1e-5)
    # ... and u03, u10 are served on all their pairs: what fold-in gives them
    gram = gramian(result.item_factors)
    for u in (3, 10):
        row = m.csr[u]
        expected = fold_in(result.item_factors, gram, row.indices, row.data, result.foldin)
        np.testing.assert_allclose(result.user_factors[u], expected, rtol=1e-4, atol=1e-5)
        assert not np.allclose(result.user_factors[u], alone.user_factors[u], atol=1e-4)

    # more than max_share held out: the plain fit, nothing recorded
    plain, record = fit_for_evaluation(trainer, m, sample, max_share=2 / m.nnz)
    assert record is None
    np.testing.assert_allclose(plain.item_factors, trainer.fit(m).item_factors,
                               rtol=1e-5, atol=1e-6)


def test_the_evaluation_solves_its_users_against_the_staged_item_factors() -> None:
    rng = np.random.default_rng(3)
    staged_ids = np.array(["w", "x", "y", "z"])  # the staged model knows one more item
    staged_y = rng.normal(size=(4, 3)).astype(np.float32)
    train = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]]))
    sample = EvalSample(users=np.array([0, 2]), train=train, item_ids=np.array(["x", "y", "z"]),
                        held_user_ids=np.array(["a"]), held_item_ids=np.array(["x"]),
                        total_pairs=6, excluded_tuning_users=0)
    params = FoldInParams.for_backend("ials", alpha=2.0, regularization=0.1, reg_exponent=0.5)
    out = staged_factors(staged_ids, staged_y, params, sample)
    assert out is not None
    fitted, _ = out
    np.testing.assert_array_equal(fitted.item_factors, staged_y[1:])  # in the log's order
    for u in (0, 2):
        row = train[u]
        np.testing.assert_allclose(
            fitted.user_factors[u],
            fold_in(staged_y[1:], gramian(staged_y[1:]), row.indices, row.data, params),
            rtol=1e-5, atol=1e-6)
    assert not fitted.user_factors[1].any()  # not scored: not solved
    # an item without a staged factor: no reuse (the evaluation refits)
    assert staged_factors(staged_ids[:3], staged_y[:3], params, sample) is None
