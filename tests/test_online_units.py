"""Unit tests of the online layer's pieces without gRPC (known answers from
tests/online_bundles.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import online_bundles as kb
import pytest

from lake.config import load_settings
from online import recommender as rec_mod
from online.catalog import Catalog
from online.errors import DeadlineExceeded, InvalidArgument, ModelLoadError, status_of
from online.model import ModelManager, RWLock, load_model
from online.recommender import FilterSpec, Recommender
from online.service import deadline_check
from online.state import OnlineState, batch_cutoff


@pytest.fixture
def engine(tmp_path: Path) -> Recommender:
    settings = load_settings(env={}, overrides={"model": {"dir": str(tmp_path / "models")},
                                                "lake": {"root": str(tmp_path / "lake")}})
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


def test_refold_drops_events_the_new_batch_model_already_learned(
    engine: Recommender, tmp_path: Path
) -> None:
    old = datetime(2026, 1, 1, 12, tzinfo=UTC)
    engine.apply_events([ev("u-cut", "B1", "purchase", old),
                         ev("u-cut", "C1", "purchase", old + timedelta(days=3))])
    st = engine.state.get("u-cut")
    assert st is not None and len(st.events) == 2
    path = kb.build(Path(engine.settings.model.dir), "v2", make_current=False)
    model = load_model(path)
    model.bundle.manifest["as_of"] = "2026-01-02"  # learned everything before Jan 3rd
    engine.state.refold(model)
    assert [e.item_id for e in st.events] == ["C1"]


def test_batch_cutoff_from_manifest() -> None:
    assert batch_cutoff({"as_of": "2026-03-04"}) == datetime(2026, 3, 5, tzinfo=UTC)
    assert batch_cutoff({"events_until": "2026-03-04T10:00:00Z"}) == \
        datetime(2026, 3, 4, 10, tzinfo=UTC)
    assert batch_cutoff({}) is None


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
