"""Folding a training user's own interactions in online reproduces the batch user vector.

The online layer re-derives user vectors with `lake.foldin.fold_in` against the item
factors of the bundle; for a user whose history did not change, that must give the
vector the trainer produced (cosine >= 0.99 for >= 99% of users), for every backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lake.config import TrainSettings
from lake.foldin import FoldInParams, fold_in, gramian
from spark_jobs.als import ALSFactors, ImplicitTrainer, MLlibTrainer, ScaledALSTrainer
from spark_jobs.matrix import InteractionMatrix


def synthetic_matrix(n_users: int = 300, n_items: int = 200, seed: int = 3) -> InteractionMatrix:
    """Low-rank taste structure, ~8% density, strengths 1..5, every user and item used."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_users, 5))
    v = rng.normal(size=(n_items, 5))
    logits = u @ v.T - 3.0
    mask = rng.random((n_users, n_items)) < 1 / (1 + np.exp(-logits))
    mask[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    mask[rng.integers(0, n_users, n_items), np.arange(n_items)] = True
    dense = mask * rng.integers(1, 6, size=mask.shape).astype(np.float64)
    return InteractionMatrix(np.array([f"u{i}" for i in range(n_users)]),
                             np.array([f"i{j}" for j in range(n_items)]), sp.csr_matrix(dense))


def foldin_cosines(m: InteractionMatrix, res: ALSFactors) -> np.ndarray:
    gram = gramian(res.item_factors)
    cos = np.empty(m.shape[0])
    for u in range(m.shape[0]):
        row = m.csr[u]
        x = fold_in(res.item_factors, gram, row.indices, row.data, res.foldin)
        b = res.user_factors[u]
        cos[u] = float(x @ b / (np.linalg.norm(x) * np.linalg.norm(b) + 1e-30))
    return cos


SETTINGS = dict(factors=16, regularization=0.1, iterations=10, alpha=2.0, seed=11, use_gpu=False)


def test_implicit_batch_vectors_equal_fold_in():
    m = synthetic_matrix()
    res = ImplicitTrainer(TrainSettings(backend="implicit", **SETTINGS)).fit(m)
    cos = foldin_cosines(m, res)
    assert np.mean(cos >= 0.99) >= 0.99, np.quantile(cos, [0, 0.01, 0.5])
    assert cos.min() > 0.9999  # the final user step solves exactly the fold-in objective


def test_implicit_without_final_user_step_is_only_approximate():
    """Why the final user step exists: implicit's own user vectors (3 CG steps against the
    previous item factors) differ from an exact fold-in against the final ones."""
    m = synthetic_matrix()
    res = ImplicitTrainer(TrainSettings(backend="implicit", **SETTINGS),
                          final_user_step=False).fit(m)
    cos = foldin_cosines(m, res)
    assert cos.min() < 0.9999


@pytest.mark.parametrize("nu", [1.0, 0.5, 0.0])
def test_ials_batch_vectors_equal_fold_in(nu):
    """ScaledALSTrainer ends with an exact float64 user solve of its objective (lambda n^nu):
    fold-in with the FoldInParams it returns reproduces every user vector."""
    m = synthetic_matrix()
    res = ScaledALSTrainer(TrainSettings(backend="ials", reg_exponent=nu, **SETTINGS)).fit(m)
    assert res.foldin.reg_exponent == nu and res.foldin.confidence_offset == 1.0
    assert res.params["reg_exponent"] == nu
    cos = foldin_cosines(m, res)
    assert cos.min() >= 0.99999, np.quantile(cos, [0, 0.01, 0.5])


def test_ials_with_cg_steps_still_ends_with_the_exact_user_solve():
    m = synthetic_matrix()
    res = ScaledALSTrainer(TrainSettings(backend="ials", reg_exponent=0.5, **SETTINGS),
                           cg_steps=3).fit(m)
    cos = foldin_cosines(m, res)
    assert cos.min() >= 0.99999, np.quantile(cos, [0, 0.01, 0.5])


def test_ials_reg_exponent_is_part_of_the_objective():
    """nu is not ignored: fold-in reproduces the vectors (not just their directions) with the
    trainer's own FoldInParams, and misses them with another nu."""
    m = synthetic_matrix()
    s = SETTINGS | {"regularization": 2.0}
    res = ScaledALSTrainer(TrainSettings(backend="ials", reg_exponent=0.0, **s)).fit(m)
    other = FoldInParams.for_backend("ials", alpha=2.0, regularization=2.0, reg_exponent=1.0)
    gram = gramian(res.item_factors)
    right, wrong = [], []
    for u in range(0, m.shape[0], 7):
        row = m.csr[u]
        b = res.user_factors[u]
        for params, errs in ((res.foldin, right), (other, wrong)):
            x = fold_in(res.item_factors, gram, row.indices, row.data, params)
            errs.append(np.linalg.norm(x - b) / np.linalg.norm(b))
    assert max(right) < 1e-4 and min(wrong) > 0.05, (max(right), min(wrong))


@pytest.mark.slow
def test_mllib_batch_vectors_equal_fold_in(spark):
    m = synthetic_matrix()
    res = MLlibTrainer(TrainSettings(backend="mllib", **SETTINGS), spark).fit(m)
    cos = foldin_cosines(m, res)
    assert np.mean(cos >= 0.99) >= 0.99, np.quantile(cos, [0, 0.01, 0.5])
    assert cos.min() > 0.999


def test_fold_in_of_an_unknown_pattern_solves_the_normal_equations():
    """Known answer independent of any trainer. All backends use c = 1 + alpha r; the
    regulariser of a row with n interactions is lambda n^nu: nu = 0 for implicit, 1 for
    MLlib, the given reg_exponent for ials."""
    y = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    both, ones = np.array([0, 1]), np.array([1.0, 1.0])
    p = FoldInParams.for_backend("implicit", alpha=3.0, regularization=1.0)
    assert p.reg_exponent == 0.0
    x = fold_in(y, gramian(y), both, ones, p)
    # YtY = diag(1, 4); c = 4 for both items: A = diag(1 + 3*1 + 1, 4 + 3*4 + 1) = diag(5, 17);
    # b = 4*(1, 0) + 4*(0, 2) = (4, 8)
    np.testing.assert_allclose(x, [4 / 5, 8 / 17], rtol=1e-6)
    q = FoldInParams.for_backend("mllib", alpha=3.0, regularization=1.0, reg_exponent=0.5)
    assert q.reg_exponent == 1.0  # MLlib's scaling is fixed
    x = fold_in(y, gramian(y), both, ones, q)
    # MLlib: lambda * n_u = 2: A = diag(1 + 3 + 2, 4 + 12 + 2) = diag(6, 18); b = (4, 8)
    np.testing.assert_allclose(x, [4 / 6, 8 / 18], rtol=1e-6)
    s = FoldInParams.for_backend("ials", alpha=3.0, regularization=1.0, reg_exponent=0.5)
    x = fold_in(y, gramian(y), both, ones, s)
    # ials, nu = 0.5: lambda * 2 ** 0.5: A = diag(4 + sqrt 2, 16 + sqrt 2); b = (4, 8)
    np.testing.assert_allclose(x, [4 / (4 + 2**0.5), 8 / (16 + 2**0.5)], rtol=1e-6)
    assert FoldInParams.for_backend("ials", alpha=3.0, regularization=1.0).reg_exponent == 1.0


def test_foldin_params_round_trip_and_old_manifests():
    """Manifests written before reg_exponent existed stored a boolean scale_reg_by_count."""
    p = FoldInParams.for_backend("ials", alpha=2.0, regularization=0.1, reg_exponent=0.75)
    assert FoldInParams.from_dict(p.to_dict()) == p
    old = {"alpha": 2.0, "regularization": 0.1, "confidence_offset": 1.0}
    assert FoldInParams.from_dict(old | {"scale_reg_by_count": True}).reg_exponent == 1.0
    assert FoldInParams.from_dict(old | {"scale_reg_by_count": False}).reg_exponent == 0.0
    assert FoldInParams.from_dict(old | {"scale_reg_by_count": True}) == \
        FoldInParams.for_backend("mllib", alpha=2.0, regularization=0.1)
    with pytest.raises(KeyError):
        FoldInParams.from_dict(old)


def test_fold_in_equals_a_dense_solve_of_the_normal_equations():
    """The compiled solve against NumPy's dense solve of the system built here, on random
    rows of random sizes (float32 factors as served, float64 arithmetic)."""
    rng = np.random.default_rng(7)
    y = (rng.standard_normal((500, 16)) * 0.3).astype(np.float32)
    gram = y.astype(np.float64).T @ y.astype(np.float64)
    p = FoldInParams.for_backend("ials", alpha=5.0, regularization=0.2, reg_exponent=0.5)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        idx = rng.choice(500, n, replace=False)
        r = rng.uniform(0.1, 4.0, n)
        yi = y[idx].astype(np.float64)
        c = 1.0 + 5.0 * r
        a = gram + yi.T @ np.diag(c - 1.0) @ yi + 0.2 * n ** 0.5 * np.eye(16)
        want = np.linalg.solve(a, c @ yi)
        np.testing.assert_allclose(fold_in(y, gram, idx, r, p), want, rtol=1e-5, atol=1e-6)
