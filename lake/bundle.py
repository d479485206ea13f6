"""The versioned model bundle: the one format the batch layer writes and the online layer reads.

Layout of `<models_dir>/<version>/`:

    manifest.json         format, version, backend, dim, counts, fold-in params, train params,
                          metrics, index info, and a sha256 + size for every other file
    user_ids.npy          (n_users,) unicode ids, row i of user_factors
    item_ids.npy          (n_items,) unicode ids, row j of item_factors
    user_factors.npy      (n_users, k) float32
    item_factors.npy      (n_items, k) float32
    item_gram.npy         (k, k) float64  YtY, for folding in users
    user_gram.npy         (k, k) float64  XtX, for folding in items
    user_items.npz        CSR (n_users x n_items) of the raw strengths the trainer saw
                          (indptr/indices/data arrays; no pickle)
    item_popularity.npy   (n_items,) float64 popularity score for the cold-start fallback
    item_index.faiss      FAISS index over item_factors (inner product); ids = row numbers.
                          With an active popularity blend (`lake.blend`) its vectors are
                          [item_factors, prior] (dim + 1) and queries [x_u, w(n_u)]

The manifest also carries the recipe the online layer must score with: `strength`
(`lake.strength.StrengthParams`: how events become interaction strengths) and `blend`
(`lake.blend.BlendParams`).

`<models_dir>/CURRENT` holds the version the servers should serve; it is replaced with an
atomic rename, and a bundle directory is itself written under a temporary name and renamed
into place, so readers never see a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from lake.blend import BlendParams, index_vectors, popularity_prior
from lake.foldin import FoldInParams, gramian
from lake.strength import StrengthParams

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
INDEX_FILE = "item_index.faiss"


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or inconsistent."""


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_gram: np.ndarray
    user_gram: np.ndarray
    user_items: sp.csr_matrix
    item_popularity: np.ndarray
    foldin: FoldInParams = field(init=False)

    def __post_init__(self) -> None:
        self.foldin = FoldInParams.from_dict(self.manifest["foldin"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index_path(self) -> Path:
        return self.path / INDEX_FILE

    @property
    def blend(self) -> BlendParams:
        return BlendParams.from_dict(self.manifest.get("blend"))

    @property
    def strength(self) -> StrengthParams | None:
        """The strength settings the model was trained with (None: a bundle from before
        they were recorded; the server then uses its configured ones)."""
        s = self.manifest.get("strength")
        return StrengthParams.from_dict(s) if s else None

    @property
    def index_dim(self) -> int:
        return self.dim + (1 if self.blend.active else 0)


def recipe_manifest(params: dict[str, Any]) -> dict[str, Any]:
    """The manifest entries (`strength`, `blend`) of a model trained with a recipe."""
    recipe = params.get("recipe")
    if not recipe:
        return {}
    return {"strength": recipe.get("strength"), "blend": recipe.get("blend")}


_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_version_name(version: str) -> str:
    """A bundle version is a plain directory name: ASCII letters, digits, `._-`, ≤100 chars.

    Checked before any path is built from it, so a request can never address a file outside
    the models directory or hit the OS's file-name limits.
    """
    if not _VERSION_NAME.fullmatch(version):
        raise BundleError(
            f"{version[:120]!r} is not a model version name "
            "(1-100 ASCII letters, digits, '.', '_' or '-', not starting with '.', '_' or '-')")
    return version


def new_version(as_of: date, run_key: str | None = None) -> str:
    """The model version of a training run for `as_of`, e.g. `v20261122-3fa91c0d`, named the
    same way by `make pipeline` and the Airflow DAG.

    Sortable by as-of date. The suffix hashes `run_key` (the DAG uses its dag and run ids,
    so every retry of a run writes the same version) or, without one, is random (each
    `make pipeline` is a new run).
    """
    suffix = (hashlib.sha256(run_key.encode()).hexdigest()[:8] if run_key is not None
              else secrets.token_hex(4))
    return f"v{as_of:%Y%m%d}-{suffix}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_meta(path: Path) -> dict[str, Any]:
    """A bundle file's manifest entry: its sha256 and size."""
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(
    models_dir: Path,
    version: str,
    *,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    user_items: sp.csr_matrix,
    item_popularity: np.ndarray,
    foldin: FoldInParams,
    backend: str,
    params: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    write_index: Callable[[np.ndarray, Path], dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle and return its directory. Does not make it current.

    `write_index(item_factors, path)` builds and saves the vector index and returns
    facts about it for the manifest (type, recall@10 vs exact, build seconds...).
    """
    user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    n_users, n_items = len(user_ids), len(item_ids)
    if user_factors.shape[0] != n_users or item_factors.shape[0] != n_items:
        raise BundleError(
            f"factor rows ({user_factors.shape[0]} users, {item_factors.shape[0]} items) "
            f"do not match id maps ({n_users} users, {n_items} items)"
        )
    if user_factors.shape[1] != item_factors.shape[1]:
        raise BundleError("user and item factors have different dimensions")
    if user_items.shape != (n_users, n_items):
        raise BundleError(f"user_items is {user_items.shape}, expected {(n_users, n_items)}")
    if not (np.all(np.isfinite(user_factors)) and np.all(np.isfinite(item_factors))):
        raise BundleError("factors contain NaN or infinity")

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / check_version_name(version)
    if final.exists():
        raise BundleError(f"bundle {final} already exists")
    tmp = models_dir / f".tmp-{version}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        csr = sp.csr_matrix(user_items, dtype=np.float32)
        np.save(tmp / "user_ids.npy", np.asarray(user_ids, dtype=str))
        np.save(tmp / "item_ids.npy", np.asarray(item_ids, dtype=str))
        np.save(tmp / "user_factors.npy", user_factors)
        np.save(tmp / "item_factors.npy", item_factors)
        np.save(tmp / "item_gram.npy", gramian(item_factors))
        np.save(tmp / "user_gram.npy", gramian(user_factors))
        np.savez(tmp / "user_items.npz", indptr=csr.indptr, indices=csr.indices, data=csr.data)
        np.save(tmp / "item_popularity.npy", np.asarray(item_popularity, dtype=np.float64))
        blend = BlendParams.from_dict((extra or {}).get("blend"))
        vectors = (index_vectors(item_factors, popularity_prior(item_popularity))
                   if blend.active else item_factors)
        index_info = write_index(vectors, tmp / INDEX_FILE)
        files = {p.name: file_meta(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT_VERSION,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "backend": backend,
            "dim": int(item_factors.shape[1]),
            "n_users": n_users,
            "n_items": n_items,
            "foldin": foldin.to_dict(),
            "params": params,
            "metrics": metrics or {},
            "index": index_info,
            "files": files,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} has no {MANIFEST}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: unsupported bundle format {manifest.get('format')!r}")
    return manifest


def verify_checksums(path: Path, manifest: dict[str, Any]) -> None:
    for name, meta in manifest["files"].items():
        p = Path(path) / name
        if not p.exists():
            raise BundleError(f"{path}: file {name} listed in the manifest is missing")
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise BundleError(f"{path}: checksum mismatch for {name}")


def read_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Load a bundle (memory-mapping nothing: it is validated in full before use)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_checksums(path, manifest)

    def load(name: str) -> np.ndarray:
        return np.load(path / name, allow_pickle=False)

    try:
        with np.load(path / "user_items.npz", allow_pickle=False) as z:
            n_users, n_items = int(manifest["n_users"]), int(manifest["n_items"])
            user_items = sp.csr_matrix(
                (z["data"], z["indices"], z["indptr"]), shape=(n_users, n_items)
            )
        bundle = Bundle(
            path=path,
            manifest=manifest,
            user_ids=load("user_ids.npy"),
            item_ids=load("item_ids.npy"),
            user_factors=load("user_factors.npy"),
            item_factors=load("item_factors.npy"),
            item_gram=load("item_gram.npy"),
            user_gram=load("user_gram.npy"),
            user_items=user_items,
            item_popularity=load("item_popularity.npy"),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: cannot load bundle: {exc}") from exc
    k = bundle.dim
    checks = [
        (bundle.user_factors.shape == (len(bundle.user_ids), k), "user_factors shape"),
        (bundle.item_factors.shape == (len(bundle.item_ids), k), "item_factors shape"),
        (bundle.item_gram.shape == (k, k), "item_gram shape"),
        (bundle.user_gram.shape == (k, k), "user_gram shape"),
        (bundle.item_popularity.shape == (len(bundle.item_ids),), "item_popularity shape"),
        (bool(np.all(np.isfinite(bundle.item_factors))), "finite item factors"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise BundleError(f"{path}: inconsistent bundle ({', '.join(bad)})")
    return bundle


def list_versions(models_dir: Path) -> list[str]:
    d = Path(models_dir)
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and (p / MANIFEST).exists())


def current_version(models_dir: Path) -> str | None:
    try:
        v = (Path(models_dir) / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return v or None


def set_current(models_dir: Path, version: str) -> None:
    """Point CURRENT at `version` atomically (write temp file, fsync, rename)."""
    models_dir = Path(models_dir)
    check_version_name(version)
    read_manifest(models_dir / version)  # refuse to point at something that is not a bundle
    tmp = models_dir / f".{CURRENT}.{secrets.token_hex(3)}"
    with tmp.open("w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, models_dir / CURRENT)
    _fsync_dir(models_dir)
