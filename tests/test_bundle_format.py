"""One model format: a staged model is a bundle that CURRENT does not name yet; the typed
manifest is parsed at load and a wrong one refused in one line naming the key; bundles
written before the manifest was typed still load; the erasure rewrites through the same
writer."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import online_bundles as kb
import pytest
import scipy.sparse as sp

from lake.blend import BlendParams
from lake.bundle import (
    ARRAY_FILES,
    INDEX_FILE,
    BundleError,
    drop_users,
    read_bundle,
    staged_path,
)
from lake.config import IndexSettings, load_settings
from lake.erasure import scrub_staging
from lake.foldin import FoldInParams
from lake.strength import StrengthParams
from lake.training_cut import TrainingCut
from lake.vector_index import build_and_save
from online.errors import ModelLoadError
from online.model_loading import load_model
from spark_jobs import publish
from spark_jobs.staging import (
    StagingError,
    TrainedModel,
    load_staged,
    save_metrics,
    save_staged,
)

CUT = TrainingCut(datetime(2026, 3, 4, tzinfo=UTC), datetime(2026, 3, 3, 22, 15, tzinfo=UTC))
STRENGTH = {"weights": {"view": 1.0, "purchase": 5.0}, "transforms": {},
            "half_life_days": 30.0, "max_confidence": 50.0}


def trained(version: str = "v1", *, seed: int = 0) -> TrainedModel:
    """4 users x 5 items, k = 3, trained with a recipe that blends in popularity."""
    rng = np.random.default_rng(seed)
    ui = sp.csr_matrix(np.array([[1, 0, 2, 0, 0], [0, 1, 0, 0, 3], [1, 1, 0, 0, 0],
                                 [0, 0, 0, 1.5, 0]]))
    return TrainedModel(
        version=version, backend="implicit", as_of=date(2026, 3, 3),
        params={"factors": 3, "recipe": {"strength": STRENGTH, "train": {"factors": 3},
                                         "blend": {"beta": 0.5, "n0": 10.0}}},
        foldin=FoldInParams.for_backend("implicit", alpha=2.0, regularization=0.1),
        user_ids=np.array(["a", "b", "c", "d"]), item_ids=np.array(["i0", "i1", "i2", "i3",
                                                                    "i4"]),
        user_factors=rng.normal(size=(4, 3)), item_factors=rng.normal(size=(5, 3)),
        user_items=ui, item_popularity=np.array([2.0, 2, 1, 1, 1]),
        info={"fit_seconds": 0.5, "device": "cpu"}, cut=CUT)


def test_a_staged_model_is_a_bundle_that_publish_serves_as_it_is(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model = trained()
    save_staged(models, model)
    staged = read_bundle(staged_path(models, "v1"))  # the one reader, checksums verified
    m = staged.manifest
    assert m.index is None and INDEX_FILE not in m.files and sorted(m.files) == sorted(
        ARRAY_FILES)
    assert (m.version, m.backend, m.as_of, m.n_users, m.n_items, m.dim) == (
        "v1", "implicit", date(2026, 3, 3), 4, 5, 3)
    assert m.strength == StrengthParams.from_dict(STRENGTH)
    assert m.blend == BlendParams(0.5, 10.0)
    assert m.cut == CUT and m.info == {"fit_seconds": 0.5, "device": "cpu"}
    assert m.metrics == {}
    with pytest.raises(ModelLoadError, match="no index .a staged model: publish it first"):
        load_model(staged_path(models, "v1"))  # CURRENT could not serve it

    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                                "model": {"dir": str(models)}})
    evaluation = {"split": "random", "k": [10], "n_test_users": 4,
                  "models": {"als": {"ndcg@10": 0.4}, "popularity": {"ndcg@10": 0.1}}}
    save_metrics(models, "v1", evaluation)
    assert publish.run(settings, version="v1")["status"] == "current"
    served = read_bundle(models / "v1")
    p = served.manifest
    # the same model file for file; publish adds the index and the evaluation only
    assert {n: p.files[n] for n in ARRAY_FILES} == dict(m.files)
    assert p.index is not None and p.index.type == "IndexFlatIP" and p.index.ntotal == 5
    assert p.metrics == evaluation and p.created_at == m.created_at
    assert p.model_dump(exclude={"index", "files", "metrics"}) == m.model_dump(
        exclude={"index", "files", "metrics"})
    loaded = load_model(models / "v1")
    assert loaded.index.ntotal == 5 and loaded.cut == CUT and loaded.blend.active
    np.testing.assert_array_equal(loaded.bundle.user_items.toarray(),
                                  model.user_items.toarray())


def test_a_staging_rerun_replaces_its_bundle_and_a_legacy_staging_is_refused(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    save_staged(models, trained(seed=1))
    second = trained(seed=2)
    assert save_staged(models, second) == models / "staging" / "v1"
    assert sorted(p.name for p in (models / "staging" / "v1").iterdir()) == ["bundle"]
    np.testing.assert_array_equal(load_staged(models, "v1").item_factors,
                                  second.item_factors)
    assert load_staged(models, "v1").cut == CUT

    old = models / "staging" / "v0"  # as releases before the one format staged a model
    old.mkdir()
    np.savez(old / "arrays.npz", user_ids=np.array(["a"]))
    (old / "model.json").write_text("{}")
    with pytest.raises(StagingError) as err:
        load_staged(models, "v0")
    assert str(err.value) == (f"staged model 'v0' under {old} was written by an earlier "
                              "release (arrays.npz); run train for it again")


def test_the_purge_deletes_old_staged_runs_holding_an_erased_user(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for version, users in (("v-old", ["a", "b"]), ("v-clean", ["c"]), ("v-young", ["a"])):
        m = trained(version)
        m.user_ids = np.array(users + ["x"] * (4 - len(users)))
        save_staged(models, m)
    legacy = models / "staging" / "v-legacy"
    legacy.mkdir()
    np.savez(legacy / "arrays.npz", user_ids=np.array(["b"]))
    two_hours_ago = time.time() - 7200
    for run in ("v-old", "v-clean"):
        os.utime(staged_path(models, run) / "manifest.json", (two_hours_ago, two_hours_ago))
    os.utime(legacy / "arrays.npz", (two_hours_ago, two_hours_ago))
    erased = {"a": datetime.now(UTC), "b": datetime.now(UTC)}
    assert scrub_staging(models, erased) == ["v-legacy", "v-old"]
    assert sorted(p.name for p in (models / "staging").iterdir()) == ["v-clean", "v-young"]


# -- the typed manifest --------------------------------------------------------------------
def edit_manifest(path: Path, change: Any) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(dim="8"), "key 'dim': Input should be a valid integer"),
    (lambda m: m.update(dim=0), "key 'dim': Input should be greater than or equal to 1"),
    (lambda m: m.pop("foldin"), "key 'foldin': Field required"),
    (lambda m: m.update(colour="red"), "key 'colour': Extra inputs are not permitted"),
    (lambda m: m.update(created_at="yesterday"),
     "key 'created_at': Value error, not an ISO date-time: 'yesterday'"),
    (lambda m: m["foldin"].pop("alpha"), "key 'foldin': Value error, incomplete or mistyped"),
    (lambda m: m.update(blend={"beta": -1, "n0": 10}),
     "key 'blend': Value error, blend beta must be finite and >= 0, got -1.0"),
    (lambda m: m["index"].update(type=3), "key 'index.type': Input should be a valid string"),
    (lambda m: m["files"]["user_ids.npy"].update(bytes=-1),
     "key 'files.user_ids.npy.bytes': Input should be greater than or equal to 0"),
    (lambda m: m.update(version="../x"), "key 'version': Value error, '../x' is not a model"),
    (lambda m: m["files"].pop("item_gram.npy"), "the manifest lists no item_gram.npy"),
    (lambda m: m.update(format=2), "unsupported bundle format 2 (this release reads 1)"),
])
def test_a_wrong_manifest_is_refused_in_one_line_naming_the_key(tmp_path: Path, change: Any,
                                                                 message: str) -> None:
    path = kb.build(tmp_path / "models", "v1")
    edit_manifest(path, change)
    with pytest.raises(BundleError) as err:
        read_bundle(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError) as refused:
        load_model(path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def write_untyped_era_bundle(path: Path) -> dict[str, Any]:
    """A bundle as the writer before the typed manifest left it on disk: the same files and
    a manifest of the keys that writer wrote (its extra entries merged in), with an older
    fold-in shape (`scale_reg_by_count`) and no blend or strength recorded."""
    path.mkdir(parents=True)
    users, items = np.array(["u0", "u1"]), np.array(["i0", "i1", "i2"])
    uf = np.array([[1, 0], [0, 1]], np.float32)
    itf = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
    ui = sp.csr_matrix(np.array([[2.0, 0, 1], [0, 3, 0]], np.float32))
    np.save(path / "user_ids.npy", users)
    np.save(path / "item_ids.npy", items)
    np.save(path / "user_factors.npy", uf)
    np.save(path / "item_factors.npy", itf)
    np.save(path / "item_gram.npy", itf.T.astype(np.float64) @ itf)
    np.save(path / "user_gram.npy", uf.T.astype(np.float64) @ uf)
    np.savez(path / "user_items.npz", indptr=ui.indptr, indices=ui.indices, data=ui.data)
    np.save(path / "item_popularity.npy", np.array([2.0, 3.0, 1.0]))
    index = build_and_save(itf, path / INDEX_FILE, IndexSettings())
    from hashlib import sha256

    files = {p.name: {"sha256": sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in sorted(path.iterdir())}
    manifest = {
        "format": 1, "version": path.name, "created_at": "2026-01-10T03:00:00.123456+00:00",
        "backend": "mllib", "dim": 2, "n_users": 2, "n_items": 3,
        "foldin": {"alpha": 4.0, "regularization": 0.1, "confidence_offset": 1.0,
                   "scale_reg_by_count": True},
        "params": {"rank": 2}, "metrics": {"ndcg@10": 0.25}, "index": index, "files": files,
        "as_of": "2026-01-09", "strength": None, "blend": None,
        "events_ts_before": "2026-01-10T00:00:00+00:00",
        "events_received_until": "2026-01-10T01:30:00+00:00",
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def test_a_bundle_written_before_the_typed_manifest_still_loads_and_serves(
        tmp_path: Path) -> None:
    path = tmp_path / "models" / "v20260109-legacy"
    write_untyped_era_bundle(path)
    model = load_model(path)
    m = model.bundle.manifest
    assert model.version == "v20260109-legacy" and m.backend == "mllib"
    assert model.foldin == FoldInParams(4.0, 0.1, 1.0, 1.0)  # scale_reg_by_count: nu = 1
    assert model.strength is None and not model.blend.active and m.info == {}
    assert model.cut == TrainingCut(datetime(2026, 1, 10, tzinfo=UTC),
                                    datetime(2026, 1, 10, 1, 30, tzinfo=UTC))
    assert m.trained_from == datetime(2026, 1, 10, tzinfo=UTC)
    info = model.info()
    assert info["created_at"] == "2026-01-10T03:00:00.123456+00:00"
    assert info["metrics"] == {"ndcg@10": 0.25} and info["index_type"] == "IndexFlatIP"
    assert model.user_history("u0")[0].tolist() == [0, 2]
    scores, rows = model.search(np.array([1.0, 0.0], np.float32), 2)
    assert rows.tolist() == [0, 2]


# -- the erasure through the same writer ---------------------------------------------------
def test_drop_users_rewrites_the_user_side_in_place(tmp_path: Path) -> None:
    path = kb.build(tmp_path / "models", "v1")
    items_before = {n: read_bundle(path).manifest.files[n] for n in ARRAY_FILES
                    if n.startswith("item")}
    assert drop_users(path, {"uB1", "nobody"}) == 1
    assert drop_users(path, {"uB1"}) == 0  # already gone
    b = read_bundle(path)  # checksums renewed
    assert b.user_ids.tolist() == ["uA0", "uA1", "uA2", "uB0", "uB2", "uC0", "uC1", "uC2"]
    assert b.manifest.n_users == 8
    # users are unit vectors along their cluster's axis: 3, 2 and 3 of them remain
    np.testing.assert_array_equal(np.diag(b.user_gram)[:3], [3.0, 2.0, 3.0])
    assert b.user_items[3].toarray().ravel()[[b.item_ids.tolist().index("B0"),
                                              b.item_ids.tolist().index("B1")]].tolist() == [
        4.0, 4.0]
    assert {n: b.manifest.files[n] for n in items_before} == items_before
    assert load_model(path).batch_user_vector("uB1") is None
