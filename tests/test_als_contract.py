"""One contract suite, run against every ALS backend (implicit, Spark MLlib, numba ials).

Fixture with a known answer: users and items fall into 4 blocks; every user interacted
with most items of their own block and nothing else. The right recommendations for a
user are the unseen items of their own block.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from lake.config import TrainSettings
from lake.foldin import FoldInParams
from spark_jobs.als import (
    ImplicitTrainer,
    MLlibTrainer,
    ScaledALSTrainer,
    TrainError,
    make_trainer,
)
from spark_jobs.matrix import InteractionMatrix
from spark_jobs.metrics import top_k

N_BLOCKS, USERS_PER, ITEMS_PER = 4, 20, 12


def block_matrix(seed: int = 0) -> tuple[InteractionMatrix, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    nu, ni = N_BLOCKS * USERS_PER, N_BLOCKS * ITEMS_PER
    ublock = np.arange(nu) // USERS_PER
    iblock = np.arange(ni) // ITEMS_PER
    same = ublock[:, None] == iblock[None, :]
    dense = (same & (rng.random((nu, ni)) < 0.7)).astype(np.float64)
    dense *= rng.integers(1, 4, size=dense.shape)  # strengths 1..3
    ids_u = np.array([f"u{i:03d}" for i in range(nu)])
    ids_i = np.array([f"i{i:03d}" for i in range(ni)])
    return InteractionMatrix(ids_u, ids_i, sp.csr_matrix(dense)), ublock, iblock


def block_hit_rate(m: InteractionMatrix, ub: np.ndarray, ib: np.ndarray, res) -> float:
    """Share of users whose top 2 unseen items (fewer if fewer remain) are of their block."""
    scores = res.user_factors @ res.item_factors.T
    seen = m.csr.toarray() > 0
    scores[seen] = -np.inf
    n_unseen = (~seen & (ub[:, None] == ib[None, :])).sum(axis=1)
    k = 2
    top = top_k(scores, k)
    ok = [
        (ib[top[u, : min(k, n_unseen[u])]] == ub[u]).all()
        for u in range(m.shape[0]) if n_unseen[u] > 0
    ]
    return float(np.mean(ok))


class ALSContract:
    """Every trainer must pass these. Subclasses provide `trainer(**settings)`."""

    backend: str
    device = "cpu"
    """Where `fit` runs with these settings (`info["device"]`)."""

    def trainer(self, **kw):
        raise NotImplementedError

    def settings(self, **kw) -> TrainSettings:
        base = dict(backend=self.backend, factors=8, regularization=0.1, iterations=10,
                    alpha=2.0, seed=7, use_gpu=False)
        base.update(kw)
        return TrainSettings(**base)

    fit_wall_seconds: float
    """Wall time of the `fitted` fixture's `fit` call."""

    @classmethod
    def timed_fit(cls, trainer, m: InteractionMatrix):
        t0 = time.perf_counter()
        res = trainer.fit(m)
        cls.fit_wall_seconds = time.perf_counter() - t0
        return res

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls):
        m, ub, ib = block_matrix()
        return m, ub, ib, cls.timed_fit(cls().trainer(), m)

    def test_shapes_types_and_params(self, fitted):
        m, _, _, res = fitted
        assert res.user_factors.shape == (m.shape[0], 8)
        assert res.item_factors.shape == (m.shape[1], 8)
        assert res.user_factors.dtype == np.float32 and res.item_factors.dtype == np.float32
        assert np.isfinite(res.user_factors).all() and np.isfinite(res.item_factors).all()
        assert res.foldin == FoldInParams.for_backend(self.backend, alpha=2.0,
                                                      regularization=0.1)
        assert res.params["backend"] == self.backend and res.params["factors"] == 8
        # the exponent the objective used: implicit 0, MLlib 1, ials the setting (default 1)
        assert res.params["reg_exponent"] == res.foldin.reg_exponent == (
            0.0 if self.backend == "implicit" else 1.0)
        # The device asked for, and a fit time measured inside this very call: seconds, not
        # ms, not a cumulative clock (rounded to ms: at most 0.5 ms over the call's wall time).
        assert res.info["device"] == self.device
        assert 0 <= res.info["fit_seconds"] <= self.fit_wall_seconds + 0.0005

    def test_recommends_unseen_items_of_the_users_block(self, fitted):
        m, ub, ib, res = fitted
        assert block_hit_rate(m, ub, ib, res) >= 0.95

    def test_similar_items_share_a_block(self, fitted):
        _, _, ib, res = fitted
        v = res.item_factors / np.linalg.norm(res.item_factors, axis=1, keepdims=True)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        nearest = sim.argmax(axis=1)
        assert np.mean(ib[nearest] == ib) >= 0.95

    def test_same_seed_same_model(self, fitted):
        m, _, _, res = fitted
        again = self.trainer().fit(m)
        np.testing.assert_allclose(again.item_factors, res.item_factors, rtol=1e-4, atol=1e-5)

    def test_the_users_to_score_get_the_vectors_of_a_full_fit(self, fitted):
        """`fit(m, users)` may skip work for the other rows, never change the asked ones."""
        m, _, _, full = fitted
        rows = np.array([0, 3, 17, m.shape[0] - 1])
        part = self.trainer().fit(m, rows)
        np.testing.assert_allclose(part.user_factors[rows], full.user_factors[rows],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part.item_factors, full.item_factors, rtol=1e-5, atol=1e-6)

    def test_empty_matrix_is_an_error(self):
        empty = InteractionMatrix(np.array([], dtype=str), np.array([], dtype=str),
                                  sp.csr_matrix((0, 0)))
        with pytest.raises(TrainError, match="empty"):
            self.trainer().fit(empty)


class TestImplicitTrainer(ALSContract):
    backend = "implicit"

    def trainer(self, **kw):
        return ImplicitTrainer(self.settings(**kw))

    def test_factory(self):
        assert isinstance(make_trainer(self.settings()), ImplicitTrainer)
        with pytest.raises(TrainError, match="use_gpu"):
            import implicit.gpu

            if implicit.gpu.HAS_CUDA:
                pytest.skip("CUDA present")
            ImplicitTrainer(self.settings(use_gpu=True)).use_gpu()


class TestScaledALSTrainer(ALSContract):
    backend = "ials"

    def trainer(self, **kw):
        return ScaledALSTrainer(self.settings(**kw))

    def test_factory(self):
        assert isinstance(make_trainer(self.settings()), ScaledALSTrainer)
        with pytest.raises(TrainError, match="unknown ALS backend"):
            make_trainer(self.settings().model_copy(update={"backend": "nope"}))

    @staticmethod
    def normal_equations(r: sp.csr_matrix, y: np.ndarray, u: int, alpha: float, lam: float,
                         nu: float) -> np.ndarray:
        """Row u's solution written out: (YtY + sum alpha r y y^T + lam n^nu I) x = sum c y."""
        y = y.astype(np.float64)
        idx, val = r[u].indices, r[u].data
        a = y.T @ y + (y[idx].T * (alpha * val)) @ y[idx]
        a += lam * len(idx) ** nu * np.eye(y.shape[1])
        return np.linalg.solve(a, (1.0 + alpha * val) @ y[idx])

    @pytest.mark.parametrize("nu", [0.0, 0.5, 1.0])
    def test_half_step_solves_each_rows_normal_equations(self, nu):
        """Known answer: every row == a direct dense solve of its normal equations, in float64
        (the final user step) and with float32 products (intermediate steps); k = 21 is not a
        multiple of the Cholesky's padding."""
        from spark_jobs.als import scaled_half_step

        m, _, _ = block_matrix(1)
        r = m.csr.astype(np.float64)
        r.data[r.indptr[3]:r.indptr[4]] = 0.0  # a user without interactions gets 0
        r.eliminate_zeros()
        items = np.random.default_rng(0).normal(size=(m.shape[1], 21)).astype(np.float32)
        with threadpool_limits(1, "blas"):
            exact = scaled_half_step(r, items, 2.0, 0.3, nu)
            fast = scaled_half_step(r, items, 2.0, 0.3, nu, gram64=False)
        assert exact.dtype == np.float32 and exact.shape == (m.shape[0], 21)
        np.testing.assert_array_equal(exact[3], 0.0)
        for u in (0, 1, 17, 40, 79):
            want = self.normal_equations(r, items, u, 2.0, 0.3, nu)
            np.testing.assert_allclose(exact[u], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(fast[u], want, rtol=1e-3, atol=1e-4)

    def test_half_step_without_regularisation_falls_back_like_fold_in(self):
        """lambda = 0 and a factor column of zeros: no Cholesky exists; the row is solved by
        fold-in's least-squares fallback, so batch and online still agree."""
        from lake.foldin import fold_in, gramian
        from spark_jobs.als import scaled_half_step

        m, _, _ = block_matrix(2)
        items = np.random.default_rng(1).normal(size=(m.shape[1], 6)).astype(np.float32)
        items[:, 2] = 0.0
        got = scaled_half_step(m.csr, items, 2.0, 0.0, 1.0)
        p = FoldInParams.for_backend("ials", alpha=2.0, regularization=0.0)
        for u in (0, 21, 50):
            row = m.csr[u]
            want = fold_in(items, gramian(items), row.indices, row.data, p)
            np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-6)
            assert np.isfinite(got[u]).all() and abs(got[u][2]) < 1e-6

    def test_cg_half_step_converges_to_the_exact_solve(self):
        """Warm-started CG: few steps move towards the exact solution, k steps reach it."""
        from spark_jobs.als import scaled_cg_half_step, scaled_half_step

        m, _, _ = block_matrix(1)
        items = np.random.default_rng(2).normal(size=(m.shape[1], 8)).astype(np.float32)
        exact = scaled_half_step(m.csr, items, 2.0, 0.3, 0.5)
        start = np.zeros_like(exact)
        err0 = np.abs(start - exact).max()
        one = scaled_cg_half_step(m.csr, items, start.copy(), 2.0, 0.3, 0.5, steps=1)
        full = scaled_cg_half_step(m.csr, items, start.copy(), 2.0, 0.3, 0.5, steps=16)
        assert np.abs(one - exact).max() < 0.9 * err0
        np.testing.assert_allclose(full, exact, rtol=1e-4, atol=1e-5)

    def test_cg_trainer_passes_the_contract_too(self, fitted):
        """cg_steps only changes the intermediate half-steps: same known answers."""
        m, ub, ib, res = fitted
        cg = ScaledALSTrainer(self.settings(), cg_steps=3).fit(m)
        assert cg.info["solver"] == "cg3" and res.info["solver"] == "cholesky"
        assert block_hit_rate(m, ub, ib, cg) >= 0.95
        with pytest.raises(ValueError, match="cg_steps"):
            ScaledALSTrainer(self.settings(), cg_steps=-1)


@pytest.mark.slow
class TestMLlibTrainer(ALSContract):
    backend = "mllib"
    device = "spark"

    @pytest.fixture(autouse=True)
    def _session(self, spark):
        type(self)._spark = spark

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, spark):
        m, ub, ib = block_matrix()
        return m, ub, ib, cls.timed_fit(MLlibTrainer(cls().settings(), spark), m)

    def settings(self, **kw) -> TrainSettings:
        # Spark's per-iteration job overhead dominates on tiny data: fewer iterations.
        return super().settings(**({"iterations": 6} | kw))

    def trainer(self, **kw):
        return MLlibTrainer(self.settings(**kw), self._spark)

    # Two extra MLlib fits cost minutes here; test_fit_dataframe_matches_fit already shows
    # that the same seed gives the same factors.
    test_same_seed_same_model = None

    def test_factory(self, spark):
        assert isinstance(make_trainer(self.settings(), spark), MLlibTrainer)

    def test_fit_dataframe_matches_fit(self, spark, fitted):
        """The job path (string ids joined by broadcast) trains the same model."""
        m, _, _, res = fitted
        coo = m.csr.tocoo()
        rows = [(str(m.user_ids[r]), str(m.item_ids[c]), float(v))
                for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)]
        rows.append(("unknown-user", str(m.item_ids[0]), 1.0))  # dropped by the join
        df = spark.createDataFrame(rows, "user_id string, item_id string, confidence double")
        again = MLlibTrainer(self.settings(), spark).fit_dataframe(df, m.user_ids, m.item_ids)
        np.testing.assert_allclose(again.item_factors, res.item_factors, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(again.user_factors, res.user_factors, rtol=1e-3, atol=1e-4)
