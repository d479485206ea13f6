"""One contract suite, run against every ALS backend (implicit, Spark MLlib, NumPy ials).

Fixture with a known answer: users and items fall into 4 blocks; every user interacted
with most items of their own block and nothing else. The right recommendations for a
user are the unseen items of their own block.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

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


class ALSContract:
    """Every trainer must pass these. Subclasses provide `trainer(**settings)`."""

    backend: str

    def trainer(self, **kw):
        raise NotImplementedError

    def settings(self, **kw) -> TrainSettings:
        base = dict(backend=self.backend, factors=8, regularization=0.1, iterations=10,
                    alpha=2.0, seed=7, use_gpu=False)
        base.update(kw)
        return TrainSettings(**base)

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls):
        m, ub, ib = block_matrix()
        return m, ub, ib, cls().trainer().fit(m)

    def test_shapes_types_and_params(self, fitted):
        m, _, _, res = fitted
        assert res.user_factors.shape == (m.shape[0], 8)
        assert res.item_factors.shape == (m.shape[1], 8)
        assert res.user_factors.dtype == np.float32 and res.item_factors.dtype == np.float32
        assert np.isfinite(res.user_factors).all() and np.isfinite(res.item_factors).all()
        assert res.foldin == FoldInParams.for_backend(self.backend, alpha=2.0,
                                                      regularization=0.1)
        assert res.params["backend"] == self.backend and res.params["factors"] == 8
        assert res.info["fit_seconds"] >= 0

    def test_recommends_unseen_items_of_the_users_block(self, fitted):
        m, ub, ib, res = fitted
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
        assert np.mean(ok) >= 0.95

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

    def test_half_step_solves_each_rows_normal_equations(self):
        """Batched, padded solve == the per-row fold-in solve of MLlib's objective."""
        from lake.foldin import fold_in, gramian
        from spark_jobs.als import scaled_half_step

        m, _, _ = block_matrix(1)
        rng = np.random.default_rng(0)
        items = rng.normal(size=(m.shape[1], 5))
        p = FoldInParams.for_backend("ials", alpha=2.0, regularization=0.3)
        got = scaled_half_step(m.csr, items, 2.0, 0.3, budget=50)  # many small batches
        gram = gramian(items)
        for u in range(m.shape[0]):
            row = m.csr[u]
            want = fold_in(items, gram, row.indices, row.data, p)
            np.testing.assert_allclose(got[u], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
class TestMLlibTrainer(ALSContract):
    backend = "mllib"

    @pytest.fixture(autouse=True)
    def _session(self, spark):
        type(self)._spark = spark

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, spark):
        m, ub, ib = block_matrix()
        return m, ub, ib, MLlibTrainer(cls().settings(), spark).fit(m)

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
