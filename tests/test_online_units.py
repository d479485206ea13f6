"""Unit tests of the online layer's pieces without gRPC (known answers from
tests/online_bundles.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import online_bundles as kb
import pytest

from lake.bundle import BundleError, check_version_name
from lake.config import load_settings
from lake.training_cut import TrainingCut
from online import recommender as rec_mod
from online.catalog import Catalog
from online.errors import DeadlineExceeded, InvalidArgument, ModelLoadError, status_of
from online.model_loading import load_model
from online.model_manager import ModelManager
from online.recommender import FilterSpec, Recommender
from online.rwlock import RWLock
from online.service import deadline_check
from online.state import OnlineState


@pytest.fixture(params=[0, 20_000], ids=["faiss-selector", "exact-subset"])
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Recommender:
    """The known-answer engine, once per way of searching under a selective filter."""
    settings = load_settings(env={}, overrides={
        "model": {"dir": str(tmp_path / "models")}, "lake": {"root": str(tmp_path / "lake")},
        "server": {"exact_filter_max_rows": request.param}})
    kb.build(Path(settings.model.dir), "v1")
    state = OnlineState(settings)
    manager = ModelManager(settings, on_new_model=lambda new, old: state.refold(new))
    manager.reload()
    return Recommender(settings, manager, state, Catalog(None))


def ev(user: str, item: str, etype: str = "view", ts: datetime | None = None) -> dict:
    return {"user_id": user, "item_id": item, "event_type": etype,
            "ts": ts or datetime.now(UTC)}


def test_fallback_walks_past_the_cached_ranking_when_filters_eat_it(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rec_mod, "FALLBACK_RANKED_BATCH_ITEMS", 2)
    out = engine.recommend("stranger", 3, FilterSpec(exclude_item_ids=frozenset({"B3", "A7"})))
    # C1 is 3rd by popularity, then the 0.01 ties in id order
    assert [i for i, _, _ in out.items] == ["C1", "A0", "A1"]
    assert out.strategy == "fallback"


def test_user_vector_is_the_fold_in_of_batch_plus_recent(engine: Recommender) -> None:
    model = engine.manager.current
    assert model is not None
    before = engine.state.profile(model, "uA0")
    np.testing.assert_array_equal(before.vector, model.batch_user_vector("uA0"))  # no events
    engine.apply_events([ev("uA0", "C3", "purchase")] * 3)
    after = engine.state.profile(model, "uA0")
    assert after.vector is not None and after.vector[2] > 0  # pulled towards C
    assert set(after.rows.tolist()) == {model.item_row[i] for i in ("A0", "A1", "C3")}
    assert after.seen_ids == {"C3"}


def test_refold_changes_nothing_and_trim_drops_only_what_the_new_model_learned(
    engine: Recommender, tmp_path: Path
) -> None:
    jan = datetime(2026, 1, 1, 12, tzinfo=UTC)
    engine.apply_events([
        ev("u-cut", "B1", "purchase", jan) | {"received_at": jan},
        ev("u-cut", "C1", "purchase", jan + timedelta(days=3)) | {
            "received_at": jan + timedelta(days=3)},
        # a late arrival: old ts, but it reached the lake after training read it
        ev("u-cut", "A5", "purchase", jan) | {"received_at": jan + timedelta(days=9)},
    ])
    st = engine.state.get("u-cut")
    assert st is not None and len(st.events) == 3
    path = kb.build(Path(engine.settings.model.dir), "v2", make_current=False)
    model = load_model(path)
    # trained on events before Jan 3rd that had arrived by Jan 5th
    model.cut = TrainingCut(datetime(2026, 1, 3, tzinfo=UTC), jan + timedelta(days=4))
    engine.state.refold(model)
    assert len(st.events) == 3  # not swapped yet: the served model still needs them all
    rows = engine.state.profile(model, "u-cut").rows
    assert {model.item_ids[r] for r in rows.tolist()} == {"C1", "A5"}  # B1 is in the batch
    assert engine.state.trim(model) == 1
    assert [e.item_id for e in st.events] == ["C1", "A5"]


def test_training_cut_from_manifest() -> None:
    legacy = TrainingCut.from_manifest({"as_of": "2026-03-04"})
    assert legacy == TrainingCut(datetime(2026, 3, 5, tzinfo=UTC), None)
    cut = TrainingCut.from_manifest({"events_ts_before": "2026-03-05T00:00:00+00:00",
                                     "events_received_until": "2026-03-05T01:30:00Z"})
    assert cut is not None and cut.received_until == datetime(2026, 3, 5, 1, 30, tzinfo=UTC)
    assert TrainingCut.from_manifest(cut.to_manifest()) == cut
    assert TrainingCut.from_manifest({}) is None
    t = datetime(2026, 3, 4, 23, tzinfo=UTC)
    assert cut.covers(t, t)  # before both cuts
    assert not cut.covers(t, datetime(2026, 3, 5, 2, tzinfo=UTC))  # arrived too late
    assert not cut.covers(datetime(2026, 3, 5, tzinfo=UTC), t)  # after the as-of day


def test_corrupt_bundle_is_refused_without_touching_the_serving_model(
    engine: Recommender,
) -> None:
    bad = kb.build(Path(engine.settings.model.dir), "v9", make_current=False)
    kb.corrupt(bad, "item_index.faiss")
    with pytest.raises(ModelLoadError, match="checksum"):
        engine.manager.reload("v9")
    assert engine.manager.current is not None and engine.manager.current.version == "v1"


class _Ctx:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_deadline_check_and_status_mapping() -> None:
    deadline_check(_Ctx(None))("work")  # no deadline
    deadline_check(_Ctx(1.0))("work")
    with pytest.raises(DeadlineExceeded) as ei:
        deadline_check(_Ctx(0.0))("fold-in")
    assert status_of(ei.value) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "deadline exceeded before fold-in")
    assert status_of(InvalidArgument("k", "bad"))[1] == "k: bad"
    assert status_of(RuntimeError("boom"))[0] == grpc.StatusCode.INTERNAL


def test_rwlock_excludes_writer_from_readers() -> None:
    import threading
    import time

    lock, log = RWLock(), []

    def reader() -> None:
        with lock.read():
            log.append("r+")
            time.sleep(0.05)
            log.append("r-")

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.01)
    with lock.write():
        log.append("w")
    t.join()
    assert log == ["r+", "r-", "w"]


def test_ingest_marks_users_stale_and_the_next_request_folds_once(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    from online import state as state_mod

    calls: list[int] = []
    real = state_mod.fold_in

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(state_mod, "fold_in", counting)
    for _ in range(5):  # five ingest calls: no linear algebra yet
        engine.apply_events([ev("lazy-user", "C3", "purchase")])
    assert calls == []
    out = engine.recommend("lazy-user", 2, FilterSpec())
    assert len(calls) == 1  # one fold-in for the whole burst...
    assert out.strategy == "personalised"
    assert [i for i, _, _ in out.items] == ["C0", "C1"]  # ...reflecting it (C3 is seen)
    engine.recommend("lazy-user", 2, FilterSpec())
    assert len(calls) == 1  # cached until the next event
    engine.apply_events([ev("lazy-user", "C0", "purchase")])
    assert [i for i, _, _ in engine.recommend("lazy-user", 2, FilterSpec()).items] == \
        ["C1", "C2"]
    assert len(calls) == 2


def test_context_requests_reuse_the_real_time_aggregate_until_the_next_event(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A basket context folds in on every request, but the user's real-time events are
    summed once per state version; each vector is the known answer: the implicit ALS
    normal equations solved for the events' strengths plus the basket's."""
    model = engine.manager.current
    assert model is not None
    calls: list[int] = []
    real = OnlineState._aggregate

    def counting(self: OnlineState, *args: object) -> dict[int, float]:
        calls.append(1)
        return real(self, *args)  # type: ignore[arg-type]

    def solved(strengths: dict[str, float]) -> np.ndarray:
        # (YtY + sum_i (c_i - 1) y_i y_i^T + lambda I) x = sum_i c_i y_i, c_i = 1 + alpha r_i
        # with the bundle's alpha 1 and lambda 0.1 (kb.FOLDIN: implicit, unscaled lambda)
        y_all = model.item_factors.astype(np.float64)
        y = y_all[[model.item_row[i] for i in strengths]]
        c = 1.0 + np.array(list(strengths.values()))
        a = y_all.T @ y_all + (y.T * (c - 1.0)) @ y + 0.1 * np.eye(kb.DIM)
        return np.linalg.solve(a, c @ y)

    monkeypatch.setattr(OnlineState, "_aggregate", counting)
    # default weights: purchase 8, view 1 (no value: counts 1; same instant: no decay)
    engine.apply_events([ev("shopper", "C3", "purchase"), ev("shopper", "B2", "view")])
    first = engine.state.profile(model, "shopper", {model.item_row["A4"]: 1.0})
    again = engine.state.profile(model, "shopper", {model.item_row["B4"]: 2.0})
    assert len(calls) == 1
    for got, want in ((first, {"C3": 8.0, "B2": 1.0, "A4": 1.0}),
                      (again, {"C3": 8.0, "B2": 1.0, "B4": 2.0})):
        assert got.vector is not None
        np.testing.assert_allclose(got.vector, solved(want), rtol=1e-5, atol=1e-6)
        got_strengths = {model.item_ids[r]: v for r, v in zip(got.rows.tolist(),
                                                             got.values.tolist(), strict=True)}
        assert got_strengths == pytest.approx(want, rel=1e-9)
    engine.apply_events([ev("shopper", "A1", "purchase")])
    after = engine.state.profile(model, "shopper", {model.item_row["A4"]: 1.0})
    assert len(calls) == 2  # the new state version's
    assert model.item_row["A1"] in after.rows.tolist()


class _RowModel:
    def __init__(self, item_ids: list[str]) -> None:
        self.item_ids = list(item_ids)
        self.item_row = {iid: i for i, iid in enumerate(self.item_ids)}

    def add(self, iid: str) -> None:
        self.item_row[iid] = len(self.item_ids)
        self.item_ids.append(iid)


def test_catalog_row_view_follows_upserts_and_new_items() -> None:
    cat = Catalog(None)
    cat.upsert([{"item_id": "x1", "category": "shoes", "available": False},
                {"item_id": "x2", "category": "hats"},
                {"item_id": "later", "category": "hats", "available": False}])
    shoes, hats = cat.category_code("shoes"), cat.category_code("hats")
    assert {shoes, hats} == {1, 2} and cat.category_code(None) == 0
    assert cat.category_code("never") is None and cat.category_codes(["hats", "never"]) == [hats]
    model = _RowModel(["x0", "x1", "x2"])
    view = cat.rows(model)
    assert view.available.tolist() == [True, False, True]  # x0 unknown: available
    assert view.category.tolist() == [0, shoes, hats]
    cat.upsert([{"item_id": "x0", "category": "socks"}, {"item_id": "x1", "category": None}])
    # a field left out keeps its value: x1 stays unavailable; a field given as None clears
    assert view.available.tolist() == [True, False, True]
    assert view.category.tolist() == [cat.category_code("socks"), 0, hats]
    model.add("later")  # added to the model online after its catalogue entry was written
    assert cat.rows(model) is view and len(view) == 4
    assert view.available.tolist()[3] is False and view.category.tolist()[3] == hats


def test_row_filters_match_the_catalogue(engine: Recommender) -> None:
    engine.catalog.upsert([{"item_id": "C2", "category": "red"},
                           {"item_id": "C3", "category": "red", "available": False},
                           {"item_id": "C4", "category": "blue"}])
    top = [i for i, _, _ in engine.recommend("uC0", 3, FilterSpec()).items]
    assert top == ["C2", "C4", "C5"]  # C0, C1 seen; C3 unavailable
    red = FilterSpec(include_categories=frozenset({"red", "unknown-category"}))
    assert [i for i, _, _ in engine.recommend("uC0", 3, red).items] == ["C2"]
    red_any = FilterSpec(include_categories=frozenset({"red"}), only_available=False)
    assert [i for i, _, _ in engine.recommend("uC0", 3, red_any).items] == ["C2", "C3"]
    no_red = FilterSpec(exclude_categories=frozenset({"red"}),
                        exclude_item_ids=frozenset({"C5"}))
    assert [i for i, _, _ in engine.recommend("uC0", 3, no_red).items] == ["C4", "C6", "C7"]
    assert [i for i, _, _ in engine.similar("C2", 2, FilterSpec(
        exclude_item_ids=frozenset({"C0"}))).items] == ["C1", "C4"]


def test_interceptor_wraps_each_method_once_and_counts_calls() -> None:
    from online.metrics import Metrics
    from online.service import ServiceInterceptor

    m = Metrics()
    icpt = ServiceInterceptor(m)
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req * 2)

    class Details:
        method = "/pkg.Svc/Double"
        invocation_metadata = ()

    first = icpt.intercept_service(lambda d: handler, Details())
    assert icpt.intercept_service(lambda d: handler, Details()) is first
    assert first.unary_unary(21, None) == 42 and first.unary_unary(1, None) == 2
    assert m.registry.get_sample_value(
        "grpc_server_handled_total", {"grpc_type": "unary", "grpc_service": "pkg.Svc",
                                      "grpc_method": "Double", "grpc_code": "OK"}) == 2.0
    assert m.registry.get_sample_value(
        "grpc_server_handling_seconds_count",
        {"grpc_type": "unary", "grpc_service": "pkg.Svc", "grpc_method": "Double"}) == 2.0


def test_selective_filters_search_once_and_follow_upserts(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    from online.loaded_model import LoadedModel

    fetched: list[int] = []
    real = LoadedModel.search

    def counting(self: LoadedModel, query: np.ndarray, k: int, selector: object = None) -> tuple:
        fetched.append(k)
        return real(self, query, k, selector)  # type: ignore[arg-type]

    monkeypatch.setattr(LoadedModel, "search", counting)
    engine.catalog.upsert([{"item_id": "A5", "category": "tiny"},
                           {"item_id": "B5", "category": "tiny", "available": False}])
    tiny = FilterSpec(include_categories=frozenset({"tiny"}))
    # uC0's vector is orthogonal to A5: plain over-fetching would need rounds to reach it
    assert [i for i, _, _ in engine.recommend("uC0", 3, tiny).items] == ["A5"]
    assert len(fetched) == 1
    fetched.clear()
    nothing = FilterSpec(include_categories=frozenset({"no-such-category"}))
    assert engine.recommend("uC0", 3, nothing).items == [] and fetched == []
    engine.catalog.upsert([{"item_id": "A5", "category": "tiny", "available": False},
                           {"item_id": "B5", "category": "tiny", "available": True}])
    assert [i for i, _, _ in engine.recommend("uC0", 3, tiny).items] == ["B5"]
    any_tiny = FilterSpec(include_categories=frozenset({"tiny"}), only_available=False)
    assert sorted(i for i, _, _ in engine.recommend("uC0", 3, any_tiny).items) == ["A5", "B5"]


def test_an_upsert_during_the_search_still_filters_the_answer(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter of a request is cached with the catalogue version it was built at; an
    upsert that lands while the search runs is still applied to that search's answer."""
    from online.loaded_model import LoadedModel

    assert [i for i, _, _ in engine.recommend("uC0", 3, FilterSpec()).items] == \
        ["C2", "C3", "C4"]  # C0, C1 seen; the filter (every row available) is now cached
    real = LoadedModel.search

    def upsert_meanwhile(self: LoadedModel, query: np.ndarray, k: int,
                         selector: object = None) -> tuple:
        engine.catalog.upsert([{"item_id": "C2", "available": False}])
        return real(self, query, k, selector)  # type: ignore[arg-type]

    monkeypatch.setattr(LoadedModel, "search", upsert_meanwhile)
    assert [i for i, _, _ in engine.recommend("uC0", 3, FilterSpec()).items] == \
        ["C3", "C4", "C5"]


@pytest.mark.parametrize("name", ["v1", "v20261122T181500Z-3fa9", "a" * 100, "model_2.b"])
def test_version_names_accepted(name: str) -> None:
    assert check_version_name(name) == name


@pytest.mark.parametrize("name", ["", ".tmp-v1", "-v", "../v1", "v1/x", "é" * 10, "a" * 101,
                                  "v 1", "v1\x00"])
def test_version_names_refused(name: str) -> None:
    with pytest.raises(BundleError, match="not a model version name"):
        check_version_name(name)


def test_filter_search_paths_agree_with_brute_force(tmp_path: Path) -> None:
    """A category of 300 among 4,000 HNSW-indexed items: the exact subset (default) and the
    FAISS selector both return the brute-force top 10 of that category."""
    import scipy.sparse as sp

    from lake.bundle import set_current, write_bundle
    from lake.config import IndexSettings
    from lake.foldin import FoldInParams
    from lake.vector_index import build_and_save
    from online.row_filters import RowSelector, RowSubset

    rng = np.random.default_rng(7)
    n, dim = 4000, 16
    items = rng.normal(size=(n, dim)).astype(np.float32)
    users = rng.normal(size=(5, dim)).astype(np.float32)
    item_ids = np.array([f"i{j}" for j in range(n)])
    models = tmp_path / "models"
    index_settings = {"exact_max_items": 1000, "hnsw_ef_search": 64}
    write_bundle(models, "v1", user_ids=np.array([f"u{j}" for j in range(5)]),
                 item_ids=item_ids, user_factors=users, item_factors=items,
                 user_items=sp.csr_matrix((5, n)), item_popularity=np.ones(n),
                 foldin=FoldInParams.for_backend("implicit", alpha=1.0, regularization=0.1),
                 backend="implicit", params={}, metrics={},
                 write_index=lambda f, p: build_and_save(f, p, IndexSettings(**index_settings)))
    set_current(models, "v1")
    in_cat = rng.choice(n, 300, replace=False)
    catalog = Catalog(None)
    catalog.upsert([{"item_id": f"i{j}", "category": "small"} for j in in_cat])
    expected = {}
    for u in range(5):
        scores = items[in_cat] @ users[u]
        expected[u] = [f"i{in_cat[j]}" for j in np.argsort(-scores)[:10]]
    f = FilterSpec(include_categories=frozenset({"small"}))
    for max_rows, kind in ((20_000, RowSubset), (0, RowSelector)):
        settings = load_settings(env={}, overrides={
            "model": {"dir": str(models)}, "lake": {"root": str(tmp_path / "lake")},
            "index": index_settings, "server": {"exact_filter_max_rows": max_rows}})
        manager = ModelManager(settings)
        manager.reload()
        assert manager.current is not None and manager.current.index_type == "IndexHNSWFlat"
        eng = Recommender(settings, manager, OnlineState(settings), catalog)
        got = {u: [i for i, _, _ in eng.recommend(f"u{u}", 10, f).items] for u in range(5)}
        view = catalog.rows(manager.current)
        assert [type(v[1][0]) for v in view.derived.values()] == [kind]
        if kind is RowSubset:
            assert got == expected
        else:  # approximate search: most of the exact answer
            hits = sum(len(set(got[u]) & set(expected[u])) for u in range(5))
            assert hits >= 45, (hits, got, expected)


def test_row_selector_admits_no_row_beyond_its_mask() -> None:
    """Rows added after a selector was built are outside it: FAISS reads its bitmap only up
    to the bitmap's size in bytes, never past the end (no row past the mask is admitted)."""
    from online.row_filters import RowSelector

    mask = np.array([True, False] * 8 + [True] * 4)  # 20 rows: 3 bytes of bitmap
    sel = RowSelector(mask, None).selector
    assert [bool(sel.is_member(r)) for r in range(20)] == mask.tolist()
    assert not any(sel.is_member(r) for r in range(20, 8 * 20))


def test_filter_cache_is_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from online.catalog import RowView

    monkeypatch.setattr(RowView, "MAX_DERIVED_BYTES", 100)
    view = RowView(np.ones(4, dtype=bool), np.zeros(4, dtype=np.int32))
    view.put_derived("a", 0, "A", nbytes=60)
    view.put_derived("b", 0, "B", nbytes=30)
    assert list(view.derived) == ["a", "b"] and view.derived_bytes == 90
    view.put_derived("c", 0, "C", nbytes=30)  # 120 > 100: the oldest goes
    assert list(view.derived) == ["b", "c"] and view.derived_bytes == 60
    view.put_derived("b", 0, "B2", nbytes=10)  # replacing an entry re-counts it
    assert view.derived_bytes == 40 and view.get_derived("b") == (True, "B2")
    view.put_derived("huge", 0, "H", nbytes=1000)  # alone over budget: still kept (newest)
    assert list(view.derived) == ["huge"]


def test_seen_items_per_user_keeps_the_newest(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "model": {"dir": str(tmp_path / "models")}, "lake": {"root": str(tmp_path / "lake")},
        "server": {"seen_items_per_user": 3}})
    kb.build(Path(settings.model.dir), "v1")
    state = OnlineState(settings)
    manager = ModelManager(settings, on_new_model=lambda new, old: state.refold(new))
    manager.reload()
    eng = Recommender(settings, manager, state, Catalog(None))
    t0 = datetime.now(UTC) - timedelta(minutes=1)
    eng.apply_events([ev("cap", f"C{i}", ts=t0 + timedelta(seconds=i)) for i in (4, 5, 6, 7)])
    eng.apply_events([ev("cap", "C5", ts=t0 + timedelta(seconds=8))])  # seen again: newest
    eng.apply_events([ev("cap", "C8", ts=t0 + timedelta(seconds=9))])  # C6 is the oldest now
    model = manager.current
    assert model is not None
    assert state.profile(model, "cap").seen_ids == {"C7", "C5", "C8"}
    out = eng.recommend("cap", 7, FilterSpec())
    # the forgotten C4 and C6 may be recommended again; C5, C7, C8 stay excluded
    assert [i for i, _, _ in out.items] == ["C0", "C1", "C2", "C3", "C4", "C6", "C9"]
