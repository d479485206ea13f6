"""The online layer scores exactly as the batch evaluation did: strengths and blend.

A model is trained on events whose strengths use every part of `lake.strength` (type
weights, value transforms, decay from the user's latest event). A user whose events then
arrive only online must get the vector the trainer gave the same history (the trainer
ends with an exact user solve, so equality is the known answer), and a served Recommend
with an active popularity blend must rank as the offline blended scorer does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lake.blend import BlendParams, blended_scores, popularity_prior
from lake.bundle import set_current, write_bundle
from lake.config import IndexSettings, TrainSettings, load_settings
from lake.strength import StrengthParams
from lake.vector_index import build_and_save
from online.catalog import Catalog
from online.model_manager import ModelManager
from online.recommender import FilterSpec, Recommender
from online.state import OnlineState
from spark_jobs.als import ImplicitTrainer
from spark_jobs.baselines import popularity
from spark_jobs.event_log import event_log_from_table
from spark_jobs.matrix import InteractionMatrix

STRENGTH = StrengthParams({"view": 1.0, "purchase": 4.0, "rating": 1.0},
                          {"rating": "linear", "purchase": "log1p"}, half_life_days=20.0)
END = datetime(2026, 11, 1, tzinfo=UTC)


def events(seed: int = 0) -> list[dict]:
    """3 taste blocks x 20 users x 10 items; views, purchases with quantities, ratings."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(60):
        block = u // 20
        for n, i in enumerate(rng.permutation(10)[: rng.integers(4, 9)]):
            etype = ["view", "purchase", "rating"][int(rng.integers(0, 3))]
            value = None if etype == "view" else float(rng.integers(1, 5))
            out.append({"user_id": f"u{u:02d}", "item_id": f"i{block * 10 + int(i):02d}",
                        "event_type": etype, "value": value,
                        "ts": END - timedelta(days=3 * n, hours=int(rng.integers(0, 24)))})
    return out


def publish(models: Path, rows: list[dict], blend: BlendParams,
            strength: StrengthParams = STRENGTH) -> tuple[InteractionMatrix, object]:
    table = pa.Table.from_pylist(rows)
    log = event_log_from_table(table.set_column(
        table.schema.get_field_index("ts"), "ts",
        pa.array([r["ts"] for r in rows], pa.timestamp("us", tz="UTC"))))
    matrix = InteractionMatrix(log.user_ids, log.item_ids, log.matrix(strength))
    train = TrainSettings(factors=6, regularization=0.5, alpha=2.0, iterations=10)
    fitted = ImplicitTrainer(train).fit(matrix)
    write_bundle(
        models, "v1", user_ids=matrix.user_ids, item_ids=matrix.item_ids,
        user_factors=fitted.user_factors, item_factors=fitted.item_factors,
        user_items=matrix.csr, item_popularity=popularity(matrix.csr), foldin=fitted.foldin,
        backend="implicit", params=fitted.params,
        write_index=lambda f, p: build_and_save(f, p, IndexSettings()),
        strength=strength, blend=blend)
    set_current(models, "v1")
    return matrix, fitted


def engine(tmp_path: Path) -> Recommender:
    settings = load_settings(env={}, overrides={
        "model": {"dir": str(tmp_path / "models")}, "lake": {"root": str(tmp_path / "lake")},
        # the server's own strength settings differ: the model's recipe must win
        "interactions": {"half_life_days": 1.0, "value_transforms": {"rating": "none"}}})
    state = OnlineState(settings)
    manager = ModelManager(settings, on_new_model=lambda new, old: state.refold(new))
    manager.reload()
    return Recommender(settings, manager, state, Catalog(None))


def test_a_user_folded_in_online_gets_the_batch_vector(tmp_path: Path) -> None:
    rows = events()
    matrix, fitted = publish(tmp_path / "models", rows, BlendParams())
    eng = engine(tmp_path)
    model = eng.manager.current
    assert model is not None and model.strength == STRENGTH
    for user in ("u03", "u27", "u55"):
        mine = [dict(r, user_id=f"clone-{user}") for r in rows if r["user_id"] == user]
        eng.apply_events(list(reversed(mine)))  # arrival order does not matter
        got = eng.state.profile(model, f"clone-{user}").vector
        want = fitted.user_factors[list(matrix.user_ids).index(user)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_served_ranking_with_the_blend_is_the_offline_one(tmp_path: Path) -> None:
    rows = events(1)
    blend = BlendParams(beta=0.8, n0=3.0)
    matrix, fitted = publish(tmp_path / "models", rows, blend)
    eng = engine(tmp_path)
    model = eng.manager.current
    assert model is not None and model.blend == blend
    prior = popularity_prior(popularity(matrix.csr))
    n_hist = np.diff(matrix.csr.indptr)
    for user in ("u00", "u21", "u59"):
        u = list(matrix.user_ids).index(user)
        offline = blended_scores(fitted.user_factors[u:u + 1], fitted.item_factors,
                                 n_hist[u:u + 1], prior, blend)[0]
        offline[matrix.csr[u].indices] = -np.inf  # exclude seen, as Recommend does
        order = np.argsort(-offline, kind="stable")[:5]
        out = eng.recommend(user, 5, FilterSpec(only_available=False))
        assert [i for i, _, _ in out.items] == [matrix.item_ids[j] for j in order]
        np.testing.assert_allclose([s for _, s, _ in out.items], offline[order], rtol=1e-4)
    # similar items ignore the prior: the neighbours by item factors alone
    out = eng.similar("i05", 3, FilterSpec(only_available=False))
    y = fitted.item_factors
    sims = y @ y[list(matrix.item_ids).index("i05")]
    sims[list(matrix.item_ids).index("i05")] = -np.inf
    assert [i for i, _, _ in out.items] == [matrix.item_ids[j] for j in np.argsort(-sims)[:3]]


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_blend_index_dimension_is_checked_at_load(tmp_path: Path, beta: float) -> None:
    publish(tmp_path / "models", events(2), BlendParams(beta=beta, n0=5.0))
    model = engine(tmp_path).manager.current
    assert model is not None
    assert model.index.faiss_index.d == 6 + (1 if beta > 0 else 0)


# The model's recipe weighs purchases 4 and does not weigh clicks; the server's own settings
# weigh them 8 and 2 (the defaults) and add_to_cart 4 where the recipe says 2.5.
RECIPE = StrengthParams({"view": 1.0, "purchase": 4.0, "add_to_cart": 2.5},
                        {"purchase": "log1p"}, half_life_days=20.0)


def test_real_time_popularity_and_new_items_weigh_events_as_the_model(tmp_path: Path) -> None:
    publish(tmp_path / "models", events(3), BlendParams(), RECIPE)
    eng = engine(tmp_path)
    assert eng.manager.current is not None and eng.manager.current.strength == RECIPE
    now = datetime.now(UTC)
    eng.apply_events([
        {"user_id": "p1", "item_id": "i00", "event_type": "view", "ts": now},
        {"user_id": "p1", "item_id": "i01", "event_type": "purchase", "ts": now},
        {"user_id": "p1", "item_id": "i02", "event_type": "click", "ts": now},
        {"user_id": "p1", "item_id": "not-in-model", "event_type": "click", "ts": now},
    ])
    pop = eng.state.popularity
    # by hand: view 1 against purchase 4 (the configured 8 would give 1/8); clicks weigh 0
    assert pop.score("i01") == pytest.approx(1.0)
    assert pop.score("i00") == pytest.approx(0.25)
    assert pop.score("i02") == 0.0
    assert eng.state.pending_items() == 0  # a click says nothing: no unknown item to fold


def test_a_basket_context_weighs_as_the_model_weighs_add_to_cart(tmp_path: Path) -> None:
    publish(tmp_path / "models", events(4), BlendParams(), RECIPE)
    eng = engine(tmp_path)
    model = eng.manager.current
    assert model is not None
    out = eng.recommend("stranger", 3, FilterSpec(only_available=False),
                        context_item_ids=["i05"])
    # By hand, implicit's objective for one interaction r = 2.5 (the recipe's add_to_cart,
    # not the configured 4): (YtY + (c - 1) y y^T + lambda I) x = c y with c = 1 + alpha r.
    y_all = model.item_factors.astype(np.float64)
    y = y_all[model.item_row["i05"]]
    c = 1.0 + model.foldin.alpha * 2.5
    a = y_all.T @ y_all + (c - 1.0) * np.outer(y, y) + \
        model.foldin.regularization * np.eye(len(y))
    x = np.linalg.solve(a, c * y)
    scores = y_all @ x
    scores[model.item_row["i05"]] = -np.inf  # a context item counts as seen
    order = np.argsort(-scores)[:3]
    assert [i for i, _, _ in out.items] == [model.item_ids[j] for j in order]
    np.testing.assert_allclose([s for _, s, _ in out.items], scores[order], rtol=1e-4)
