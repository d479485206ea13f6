"""Staged models: what `train` hands to `evaluate` and `publish`, on disk without pickle.

Layout of `<models_dir>/staging/<version>/`:

    model.json            version, backend, as_of, train params, fold-in params, shapes
    arrays.npz            user_ids, item_ids (unicode), user_factors, item_factors (float32),
                          user_items_{indptr,indices,data,shape}, item_popularity (float64)
    metrics.json          written by `evaluate` (see `save_metrics`)
    inputs.json           written by the pipeline: the fingerprint of what the model was
                          built from (`inputs_fingerprint`)

A rerun of the same version overwrites the files (arrays are written to a temporary name
and renamed into place, so a reader never sees a half-written file). Loading uses
`np.load(..., allow_pickle=False)`.

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

from lake.foldin import FoldInParams

if TYPE_CHECKING:
    from lake.config import Settings

STAGING = "staging"
MODEL_JSON = "model.json"
ARRAYS = "arrays.npz"
METRICS_JSON = "metrics.json"
FORMAT_VERSION = 1


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
    """Free-form facts about the run (fit seconds, device, ...); stored in model.json."""

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


def staged_dir(models_dir: Path | str, version: str) -> Path:
    if not version or "/" in version or version in (".", ".."):
        raise StagingError(f"invalid model version {version!r}")
    return Path(models_dir) / STAGING / version


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_staged(models_dir: Path | str, model: TrainedModel) -> Path:
    """Write `model` to `<models_dir>/staging/<version>/` (overwriting a previous run)."""
    model.validate()
    d = staged_dir(models_dir, model.version)
    d.mkdir(parents=True, exist_ok=True)
    csr = model.user_items.tocsr()
    csr.sort_indices()
    tmp = d / f"{ARRAYS}.tmp{os.getpid()}.npz"
    np.savez(
        tmp,
        user_ids=model.user_ids.astype(str),
        item_ids=model.item_ids.astype(str),
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        user_items_indptr=csr.indptr.astype(np.int64),
        user_items_indices=csr.indices.astype(np.int32),
        user_items_data=csr.data.astype(np.float64),
        user_items_shape=np.asarray(csr.shape, dtype=np.int64),
        item_popularity=model.item_popularity,
    )
    os.replace(tmp, d / ARRAYS)
    meta = {
        "format": FORMAT_VERSION,
        "version": model.version,
        "backend": model.backend,
        "as_of": model.as_of.isoformat() if model.as_of else None,
        "params": model.params,
        "foldin": model.foldin.to_dict(),
        "n_users": len(model.user_ids),
        "n_items": len(model.item_ids),
        "factors": model.factors,
        "nnz": int(csr.nnz),
        "info": model.info,
    }
    _atomic_write_text(d / MODEL_JSON, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return d


def load_staged(models_dir: Path | str, version: str) -> TrainedModel:
    """Read a staged model written by `save_staged`."""
    d = staged_dir(models_dir, version)
    if not (d / MODEL_JSON).exists() or not (d / ARRAYS).exists():
        raise StagingError(f"no staged model {version!r} under {d}")
    meta = json.loads((d / MODEL_JSON).read_text())
    with np.load(d / ARRAYS, allow_pickle=False) as z:
        ui = sp.csr_matrix(
            (z["user_items_data"], z["user_items_indices"], z["user_items_indptr"]),
            shape=tuple(int(x) for x in z["user_items_shape"]),
        )
        return TrainedModel(
            version=meta["version"],
            backend=meta["backend"],
            as_of=date.fromisoformat(meta["as_of"]) if meta.get("as_of") else None,
            params=dict(meta.get("params") or {}),
            foldin=FoldInParams.from_dict(meta["foldin"]),
            user_ids=z["user_ids"],
            item_ids=z["item_ids"],
            user_factors=z["user_factors"],
            item_factors=z["item_factors"],
            user_items=ui,
            item_popularity=z["item_popularity"],
            info=dict(meta.get("info") or {}),
        )


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
