"""`online.model_manager.ModelManager`: the erasures it remembers stay bounded (issue 27
point 12: `_erased` grew for the life of the process), and still reach every model that
could hold the user, in memory and after a rollback through the lake's record."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import online_bundles as kb
from lambdarec_client import Client

from lake.config import load_settings
from lake.training_cut import TrainingCut
from online.model_manager import ModelManager
from online.pb import recommender_pb2 as pb
from online.server import create_server

OLD_CUT = TrainingCut(datetime(2020, 1, 1, tzinfo=UTC)).to_manifest()
"""Trained on events before 2020: every erasure since may be in it."""
LATER_CUT = TrainingCut(datetime(2100, 1, 1, tzinfo=UTC)).to_manifest()
"""With a cut past its creation, the model's training started when it was written."""


def test_erasures_are_dropped_once_a_model_trained_after_them_is_loaded(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    kb.build(models, "v1", manifest=OLD_CUT)
    kb.build(models, "v1b", manifest=OLD_CUT, make_current=False)
    settings = load_settings(env={}, overrides={"model": {"dir": str(models)}})
    manager = ModelManager(settings)
    manager.reload("v1")
    for i in range(50):
        manager.forget(f"gone{i}")
    manager.forget("uA0")
    assert len(manager._erased) == 51
    assert manager.current.batch_user_vector("uA0") is None

    manager.reload("v1b")  # trained before the erasures: they apply, and are kept
    assert manager.current.batch_user_vector("uA0") is None
    assert len(manager._erased) == 51

    kb.build(models, "v2", manifest=LATER_CUT, make_current=False)  # trained after them
    manager.reload("v2")
    assert manager.current.batch_user_vector("uA0") is not None  # its training saw none
    assert len(manager._erased) == 0 and manager.erasures_kept == 0

    manager.forget("uB0")  # a later erasure is remembered again, for the next model
    assert manager.erasures_kept == 1
    assert manager.current.batch_user_vector("uB0") is None


def test_a_rollback_after_the_memory_let_go_still_hides_the_user(tmp_path: Path) -> None:
    """The server's load hook reads the lake's user_erasures for every model it loads."""
    models = tmp_path / "models"
    kb.build(models, "v1", manifest=OLD_CUT)
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(models)},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": "manager-test-token", "wal_dir": str(tmp_path / "wal")}})
    server, ports = create_server(settings, metrics=False)
    server.start()
    c = Client(f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}",
               token="manager-test-token", timeout=30)
    try:
        c.forget_user("uA0")
        kb.build(models, "v2", manifest=LATER_CUT, make_current=False)
        c.reload("v2")
        assert server.manager.erasures_kept == 0
        c.reload("v1")  # back to a model trained before the erasure
        assert c.recommend("uA0", k=2).strategy == pb.STRATEGY_FALLBACK
        assert c.recommend("uA1", k=2).strategy == pb.STRATEGY_PERSONALISED
    finally:
        c.close()
        server.stop(grace=1)
