"""Staged models: what `train` hands to `evaluate` and `publish`, on disk as a bundle.

A staged model is a model bundle (`lake.bundle`, the one format) that CURRENT does not name
yet: no index and no metrics. Layout of `<models_dir>/staging/<version>/`:

    bundle/               the model: `lake.bundle.save_bundle` / `read_bundle` (ids,
                          factors, the strengths the trainer saw, popularity; the manifest
                          holds backend, as-of, train params, fold-in params, the recipe's
                          strength and blend, the training cut and the run's facts)
    metrics.json          written by `evaluate` (see `save_metrics`)
    inputs.json           written by the pipeline: the fingerprint of what the model was
                          built from (`inputs_fingerprint`)
    tuning.json           written by `tune` (`spark_jobs.recipe`)

A rerun of the same version replaces `bundle/` (written under a temporary name and renamed
into place, so a reader never sees a half-written model; checksummed, no pickle). A run
staged by an earlier release (`arrays.npz` + `model.json`) is refused with one line: train
it again.

Metrics shape (the publish gate reads it):

    {"split": "time" | "random", "k": [5, 10, ...], "n_test_users": int,
     "models": {"als": {"ndcg@10": ..., "recall@10": ..., "map@10": ..., "coverage@10": ...},
                "popularity": {...}, "ease": {...}  # absent when skipped
               },
     "report": "<path to report.md>"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from lake.blend import BlendParams
from lake.bundle import (
    LEGACY_STAGED_ARRAYS,
    STAGED_BUNDLE,
    STAGING,
    Bundle,
    read_bundle,
    save_bundle,
    staged_path,
)
from lake.foldin import FoldInParams
from lake.strength import StrengthParams
from lake.training_cut import TrainingCut

if TYPE_CHECKING:
    from lake.config import Settings

METRICS_JSON = "metrics.json"


class StagingError(ValueError):
    """A staged model is missing, incomplete or inconsistent."""


@dataclass
class TrainedModel:
    """A trained ALS model plus everything the evaluation and the bundle need."""

    version: str
    backend: str
    as_of: date | None
    params: dict[str, Any]
    foldin: FoldInParams
    user_ids: np.ndarray
    """(n_users,) str ids; row i of `user_factors` and of `user_items`."""
    item_ids: np.ndarray
    """(n_items,) str ids; row j of `item_factors`, column j of `user_items`."""
    user_factors: np.ndarray
    """(n_users, k) float32."""
    item_factors: np.ndarray
    """(n_items, k) float32."""
    user_items: sp.csr_matrix
    """(n_users, n_items) raw strengths r the trainer saw (before alpha)."""
    item_popularity: np.ndarray
    """(n_items,) float64, e.g. the sum of confidence per item."""
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the run (fit seconds, device, ...); in the manifest's `info`."""
    cut: TrainingCut | None = None
    """The events the model learned from (`lake.training_cut`), for the servers."""

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids).astype(str)
        self.item_ids = np.asarray(self.item_ids).astype(str)
        self.user_factors = np.ascontiguousarray(self.user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(self.item_factors, dtype=np.float32)
        self.item_popularity = np.asarray(self.item_popularity, dtype=np.float64)
        self.user_items = sp.csr_matrix(self.user_items)
        self.validate()

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    def validate(self) -> None:
        nu, ni = len(self.user_ids), len(self.item_ids)
        if self.user_factors.ndim != 2 or self.user_factors.shape[0] != nu:
            raise StagingError(f"user_factors shape {self.user_factors.shape} != ({nu}, k)")
        if self.item_factors.ndim != 2 or self.item_factors.shape[0] != ni:
            raise StagingError(f"item_factors shape {self.item_factors.shape} != ({ni}, k)")
        if self.user_factors.shape[1] != self.item_factors.shape[1]:
            raise StagingError("user and item factors differ in dimension")
        if self.user_items.shape != (nu, ni):
            raise StagingError(f"user_items shape {self.user_items.shape} != ({nu}, {ni})")
        if self.item_popularity.shape != (ni,):
            raise StagingError(f"item_popularity shape {self.item_popularity.shape} != ({ni},)")

    def to_bundle(self) -> Bundle:
        """The model as a bundle (in memory): the recipe's strength and blend and the
        training cut go into the manifest, where the servers read them."""
        self.validate()
        recipe = self.params.get("recipe") or {}
        return Bundle.create(
            version=self.version, backend=self.backend, as_of=self.as_of,
            user_ids=self.user_ids, item_ids=self.item_ids,
            user_factors=self.user_factors, item_factors=self.item_factors,
            user_items=self.user_items, item_popularity=self.item_popularity,
            foldin=self.foldin, params=self.params,
            strength=StrengthParams.from_dict(recipe["strength"]) if recipe else None,
            blend=BlendParams.from_dict(recipe.get("blend")), cut=self.cut, info=self.info)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TrainedModel:
        m = bundle.manifest
        return cls(
            version=m.version, backend=m.backend, as_of=m.as_of, params=dict(m.params),
            foldin=m.foldin, user_ids=bundle.user_ids, item_ids=bundle.item_ids,
            user_factors=bundle.user_factors, item_factors=bundle.item_factors,
            user_items=bundle.user_items, item_popularity=bundle.item_popularity,
            info=dict(m.info), cut=m.cut if m.events_ts_before is not None else None)


def staged_dir(models_dir: Path | str, version: str) -> Path:
    if not version or "/" in version or version in (".", ".."):
        raise StagingError(f"invalid model version {version!r}")
    return Path(models_dir) / STAGING / version


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_staged(models_dir: Path | str, model: TrainedModel) -> Path:
    """Write `model` as the bundle `<models_dir>/staging/<version>/bundle/` (replacing a
    previous run's); returns `<models_dir>/staging/<version>`."""
    d = staged_dir(models_dir, model.version)
    save_bundle(model.to_bundle(), staged_path(models_dir, model.version), replace=True)
    return d


def staged_bundle(models_dir: Path | str, version: str) -> Bundle:
    """The staged model of `version` as its bundle (checksums verified).

    Raises:
        StagingError: none staged, or staged by an earlier release.
        BundleError: the bundle is incomplete or corrupt.
    """
    d = staged_dir(models_dir, version)
    if not (d / STAGED_BUNDLE).is_dir():
        if (d / LEGACY_STAGED_ARRAYS).exists():
            raise StagingError(f"staged model {version!r} under {d} was written by an earlier "
                               f"release ({LEGACY_STAGED_ARRAYS}); run train for it again")
        raise StagingError(f"no staged model {version!r} under {d}")
    return read_bundle(d / STAGED_BUNDLE)


def load_staged(models_dir: Path | str, version: str) -> TrainedModel:
    """Read a staged model written by `save_staged`."""
    return TrainedModel.from_bundle(staged_bundle(models_dir, version))


def save_metrics(models_dir: Path | str, version: str, metrics: dict[str, Any]) -> Path:
    """Write `staging/<version>/metrics.json` (overwrites)."""
    d = staged_dir(models_dir, version)
    d.mkdir(parents=True, exist_ok=True)
    path = d / METRICS_JSON
    _atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return path


def load_metrics(models_dir: Path | str, version: str) -> dict[str, Any]:
    path = staged_dir(models_dir, version) / METRICS_JSON
    if not path.exists():
        raise StagingError(f"no metrics for staged model {version!r} at {path}")
    return json.loads(path.read_text())


INPUTS_JSON = "inputs.json"
MODEL_SECTIONS = ("interactions", "train", "evaluate", "gate", "tune", "blend", "index")
"""The settings a model and its evaluation depend on (not where it is served or stored)."""


def inputs_fingerprint(settings: Settings, silver_version: int, as_of: date) -> str:
    """What a pipeline run builds its model from: the silver snapshot it reads (the lake and
    its version), the as-of date and the model-defining settings. Two runs with the same
    fingerprint train, evaluate and gate the same model."""
    import hashlib

    key = {"lake": str(settings.lake.root), "silver_version": silver_version,
           "as_of": as_of.isoformat(),
           **{s: getattr(settings, s).model_dump(mode="json") for s in MODEL_SECTIONS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def save_inputs(models_dir: Path | str, version: str, fingerprint: str) -> None:
    """Record in `staging/<version>/inputs.json` what the model was built from."""
    d = staged_dir(models_dir, version)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(d / INPUTS_JSON, json.dumps({"fingerprint": fingerprint}))


def load_inputs(models_dir: Path | str, version: str) -> str | None:
    """The fingerprint `save_inputs` recorded for `version`, or None."""
    path = staged_dir(models_dir, version) / INPUTS_JSON
    try:
        return str(json.loads(path.read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
