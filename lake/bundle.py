"""The model bundle: the one format a trained model has on disk, staged or served.

`train` writes a model as a bundle under `<models_dir>/staging/<version>/bundle/` (no index,
no metrics yet); `publish` writes the same bundle, with its FAISS index and the evaluation
in the manifest, as `<models_dir>/<version>/`; `CURRENT` names the one the servers serve.
One writer (`save_bundle`) and one reader (`read_bundle`) serve all of them, the erasure's
in-place rewrite (`drop_users`) included, as implicit has one `save` and one `load`.

Layout of a bundle directory:

    manifest.json         the typed `Manifest`: format, version, backend, dim, counts,
                          fold-in params, strength and blend recipe, training cut, train
                          params, run facts, metrics, index info, and a sha256 + size for
                          every other file
    user_ids.npy          (n_users,) unicode ids, row i of user_factors
    item_ids.npy          (n_items,) unicode ids, row j of item_factors
    user_factors.npy      (n_users, k) float32
    item_factors.npy      (n_items, k) float32
    item_gram.npy         (k, k) float64  YtY, for folding in users
    user_gram.npy         (k, k) float64  XtX, for folding in items
    user_items.npz        CSR (n_users x n_items) of the raw strengths the trainer saw
                          (indptr/indices/data arrays; no pickle)
    item_popularity.npy   (n_items,) float64 popularity score for the cold-start fallback
    item_index.faiss      published bundles only: FAISS index over item_factors (inner
                          product); ids = row numbers. With an active popularity blend
                          (`lake.blend`) its vectors are [item_factors, prior] (dim + 1) and
                          queries [x_u, w(n_u)]

Arrays are read with `allow_pickle=False`. The manifest is parsed into `Manifest` at load;
a wrong or unknown key refuses the bundle with one line naming the key. Bundles written
before the manifest was typed have the same layout and keys and load unchanged.

A bundle directory is written under a temporary name and renamed into place, so readers
never see a half-written bundle; a rewrite of an existing one (`replace=True`: a staged
model trained again) renames the old one aside first. `CURRENT` is replaced with an atomic
rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from dataclasses import replace as _replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, TypeVar

import numpy as np
import scipy.sparse as sp
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
)

from lake.blend import BlendParams, index_vectors, popularity_prior
from lake.foldin import FoldInParams, gramian
from lake.strength import StrengthParams
from lake.training_cut import TrainingCut
from lake.training_cut import trained_from as _trained_from

FORMAT_VERSION: Literal[1] = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
INDEX_FILE = "item_index.faiss"
STAGING = "staging"
"""`<models_dir>/staging/<version>/`: a run's staged model and the files its jobs write."""
STAGED_BUNDLE = "bundle"
"""The staged model of a run: the bundle `<models_dir>/staging/<version>/bundle/`."""
LEGACY_STAGED_ARRAYS = "arrays.npz"
"""How releases before the one format staged a model (`arrays.npz` + `model.json`). Only its
user ids are still read (`staged_user_ids`), so the erasure purges an upgrade's old staged
runs too; loading one is refused (`spark_jobs.staging`)."""
USER_FILES = ("user_ids.npy", "user_factors.npy", "user_gram.npy", "user_items.npz")
ARRAY_FILES = (*USER_FILES, "item_ids.npy", "item_factors.npy", "item_gram.npy",
               "item_popularity.npy")


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or inconsistent."""


# -- the manifest ------------------------------------------------------------------------
def _utc(value: Any) -> datetime:
    """An instant from its ISO text (naive = UTC, as the batch layer writes UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not an ISO date-time: {value!r}") from exc
    if not isinstance(value, datetime):
        raise ValueError(f"expected an ISO date-time, got {type(value).__name__}")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            return _utc(value).date()
    raise ValueError(f"expected an ISO date, got {type(value).__name__}")


_P = TypeVar("_P")


def _reader(cls: type[_P], parse: Callable[[Any], _P]) -> Callable[[Any], _P]:
    """How a recipe dataclass field is read: with its own `from_dict`, which knows its
    older shapes (a wrong one is a ValueError, so the message names the key)."""

    def validate(value: Any) -> _P:
        if isinstance(value, cls):
            return value
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        try:
            return parse(value)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete or mistyped: {exc}") from exc

    return validate


UtcDatetime = Annotated[datetime, PlainValidator(_utc), PlainSerializer(datetime.isoformat)]
IsoDate = Annotated[date, PlainValidator(_date), PlainSerializer(date.isoformat)]
FoldIn = Annotated[FoldInParams, PlainValidator(_reader(FoldInParams, FoldInParams.from_dict)),
                   PlainSerializer(FoldInParams.to_dict)]
Strength = Annotated[StrengthParams,
                     PlainValidator(_reader(StrengthParams, StrengthParams.from_dict)),
                     PlainSerializer(StrengthParams.to_dict)]
Blend = Annotated[BlendParams, PlainValidator(_reader(BlendParams, BlendParams.from_dict)),
                  PlainSerializer(BlendParams.to_dict)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True,
                              use_attribute_docstrings=True)


class FileMeta(_Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class IndexInfo(_Frozen):
    """What `write_index` reports about the index it built (`lake.vector_index`)."""

    type: str
    """The FAISS index class, e.g. `IndexFlatIP`, `IndexHNSWFlat`."""
    ntotal: int | None = None
    metric: str | None = None
    recall_at_10: float | None = None
    """Recall@10 against exact search on sample queries."""
    build_seconds: float | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None


class Manifest(_Frozen):
    """`manifest.json`: everything about a bundle but its arrays, typed."""

    format: Literal[1]
    version: str
    created_at: UtcDatetime
    """When the model was trained (written), UTC."""
    backend: str
    """The trainer: implicit, mllib or ials."""
    as_of: IsoDate | None = None
    """The gold partition the model was trained on."""
    dim: int = Field(ge=1)
    n_users: int = Field(ge=0)
    n_items: int = Field(ge=0)
    foldin: FoldIn
    """The objective the trainer solved, for folding in online."""
    strength: Strength | None = None
    """How events became interaction strengths (None: a bundle from before it was
    recorded; the server then uses its configured settings)."""
    blend: Blend = BlendParams()
    """The popularity blend the index is built for (`lake.blend`)."""
    events_ts_before: UtcDatetime | None = None
    """Training cut (`lake.training_cut`): events with `ts` before this were trained on..."""
    events_received_until: UtcDatetime | None = None
    """...when they had arrived by this instant (None: unknown)."""
    params: dict[str, Any] = {}
    """The trainer's hyper-parameters and the recipe."""
    info: dict[str, Any] = {}
    """Facts about the training run (fit seconds, device, gold version, held-out pairs)."""
    metrics: dict[str, Any] = {}
    """The evaluation (`spark_jobs.staging` documents its shape); empty until published."""
    index: IndexInfo | None = None
    """The vector index (None: a staged bundle, which has none yet)."""
    files: dict[str, FileMeta] = {}

    @field_validator("version")
    @classmethod
    def _version_name(cls, v: str) -> str:
        return check_version_name(v)

    @property
    def cut(self) -> TrainingCut | None:
        """The events the model was trained on (`lake.training_cut`)."""
        return TrainingCut.from_manifest(self)

    @property
    def trained_from(self) -> datetime | None:
        """The earliest instant training could have read the lake (`lake.training_cut`)."""
        return _trained_from(self)

    def same_model(self, other: Manifest) -> bool:
        """True when `other` describes the same trained model: the same arrays (as their
        sha256 record them) and every entry but the evaluation and the index."""

        def key(m: Manifest) -> dict[str, Any]:
            return m.model_dump(mode="json", exclude={"metrics", "index", "files"}) | {
                "files": {n: m.files[n].sha256 for n in ARRAY_FILES if n in m.files}}

        return key(self) == key(other)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    @classmethod
    def parse(cls, text: str, where: Path) -> Manifest:
        """Parse `manifest.json`'s text; BundleError (one line naming the key) if wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT_VERSION:
            raise BundleError(f"{where.parent}: unsupported bundle format "
                              f"{raw.get('format')!r} (this release reads {FORMAT_VERSION})")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            errors = exc.errors()
            first = errors[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top level)"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise BundleError(f"{where}: key {key!r}: {first['msg']}{more}") from None


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """`value` as it reads back from JSON (numpy scalars, dates... as JSON has them), so a
    bundle in memory equals the one read from disk."""
    return dict(json.loads(json.dumps(dict(value or {}), sort_keys=True, default=str)))


# -- the bundle --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Bundle:
    """A model: its manifest and arrays; `path` where it was read from or saved to."""

    manifest: Manifest
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_gram: np.ndarray
    user_gram: np.ndarray
    user_items: sp.csr_matrix
    item_popularity: np.ndarray
    path: Path | None = None

    @classmethod
    def create(
        cls,
        *,
        version: str,
        backend: str,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        user_items: sp.spmatrix,
        item_popularity: np.ndarray,
        foldin: FoldInParams,
        params: Mapping[str, Any] | None = None,
        as_of: date | None = None,
        strength: StrengthParams | None = None,
        blend: BlendParams | None = None,
        cut: TrainingCut | None = None,
        info: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Bundle:
        """A new model in memory (not saved: no path, no files yet); checks its shapes.

        Raises:
            BundleError: the arrays do not fit together, or a manifest value is wrong.
        """
        user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        n_users, n_items = len(user_ids), len(item_ids)
        if user_factors.ndim != 2 or item_factors.ndim != 2:
            raise BundleError("factors must be 2-D (rows x k)")
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
        popularity = np.asarray(item_popularity, dtype=np.float64)
        if popularity.shape != (n_items,):
            raise BundleError(f"item_popularity is {popularity.shape}, expected ({n_items},)")
        try:
            manifest = Manifest(
                format=FORMAT_VERSION, version=version, created_at=datetime.now(UTC),
                backend=backend, as_of=as_of, dim=int(item_factors.shape[1]),
                n_users=n_users, n_items=n_items, foldin=foldin, strength=strength,
                blend=blend or BlendParams(),
                events_ts_before=cut.ts_before if cut else None,
                events_received_until=cut.received_until if cut else None,
                params=_plain(params), info=_plain(info), metrics=_plain(metrics),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BundleError(f"manifest key {'.'.join(map(str, first['loc']))!r}: "
                              f"{first['msg']}") from None
        return cls(
            manifest=manifest,
            user_ids=np.asarray(user_ids).astype(str),
            item_ids=np.asarray(item_ids).astype(str),
            user_factors=user_factors, item_factors=item_factors,
            item_gram=gramian(item_factors), user_gram=gramian(user_factors),
            user_items=sp.csr_matrix(user_items, dtype=np.float32),
            item_popularity=popularity,
        )

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def foldin(self) -> FoldInParams:
        return self.manifest.foldin

    @property
    def blend(self) -> BlendParams:
        return self.manifest.blend

    @property
    def strength(self) -> StrengthParams | None:
        """The strength settings the model was trained with (None: a bundle from before
        they were recorded; the server then uses its configured ones)."""
        return self.manifest.strength

    @property
    def cut(self) -> TrainingCut | None:
        return self.manifest.cut

    @property
    def index_path(self) -> Path:
        if self.path is None:
            raise BundleError(f"bundle {self.version} is not saved: it has no index file")
        return self.path / INDEX_FILE

    @property
    def index_dim(self) -> int:
        return self.dim + (1 if self.blend.active else 0)

    def with_metrics(self, metrics: Mapping[str, Any]) -> Bundle:
        """The same model with `metrics` (its evaluation) in the manifest, not saved."""
        return _replace(self, path=None,
                        manifest=self.manifest.model_copy(update={"metrics": _plain(metrics)}))

    def arrays(self) -> dict[str, np.ndarray | sp.csr_matrix]:
        """The bundle's array files and what each holds."""
        return {
            "user_ids.npy": np.asarray(self.user_ids, dtype=str),
            "item_ids.npy": np.asarray(self.item_ids, dtype=str),
            "user_factors.npy": self.user_factors,
            "item_factors.npy": self.item_factors,
            "item_gram.npy": self.item_gram,
            "user_gram.npy": self.user_gram,
            "user_items.npz": self.user_items,
            "item_popularity.npy": self.item_popularity,
        }


# -- names -------------------------------------------------------------------------------
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


def staged_path(models_dir: Path | str, version: str) -> Path:
    """Where the staged model of `version` lives: `<models_dir>/staging/<version>/bundle`."""
    return Path(models_dir) / STAGING / check_version_name(version) / STAGED_BUNDLE


# -- writing -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_meta(path: Path) -> FileMeta:
    """A bundle file's manifest entry: its sha256 and size."""
    return FileMeta(sha256=_sha256(path), bytes=path.stat().st_size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary name, fsynced, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp{secrets.token_hex(3)}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_array(path: Path, value: np.ndarray | sp.csr_matrix) -> FileMeta:
    if isinstance(value, sp.csr_matrix):
        _write_file(path, lambda f: np.savez(f, indptr=value.indptr, indices=value.indices,
                                             data=value.data))
    else:
        _write_file(path, lambda f: np.save(f, value, allow_pickle=False))
    return file_meta(path)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    text = manifest.to_json().encode()
    _write_file(directory / MANIFEST, lambda f: f.write(text))


def save_bundle(
    bundle: Bundle,
    path: Path | str,
    *,
    write_index: Callable[[np.ndarray, Path], Mapping[str, Any]] | None = None,
    replace: bool = False,
) -> Bundle:
    """Write `bundle` as the directory `path` and return it as saved (path, files, index).

    Args:
        bundle: the model (`Bundle.create`, `read_bundle`, `Bundle.with_metrics`).
        path: the bundle directory: `<models_dir>/<version>` to publish,
            `staged_path(...)` to stage.
        write_index: `write_index(vectors, path)` builds and saves the vector index and
            returns facts about it for the manifest (`IndexInfo`); None: no index (a staged
            bundle).
        replace: an existing directory at `path` is replaced (renamed aside, then deleted);
            otherwise it is an error.

    Raises:
        BundleError: `path` exists (without `replace`), or the index facts are wrong.
    """
    final = Path(path)
    if final.exists() and not replace:
        raise BundleError(f"bundle {final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        files = {name: _save_array(tmp / name, value)
                 for name, value in bundle.arrays().items()}
        index = None
        if write_index is not None:
            vectors = (index_vectors(bundle.item_factors, popularity_prior(bundle.item_popularity))
                       if bundle.blend.active else bundle.item_factors)
            facts = write_index(vectors, tmp / INDEX_FILE)
            try:
                index = IndexInfo.model_validate(dict(facts))
            except ValidationError as exc:
                first = exc.errors()[0]
                raise BundleError(f"index facts: key {'.'.join(map(str, first['loc']))!r}: "
                                  f"{first['msg']}") from None
            files[INDEX_FILE] = file_meta(tmp / INDEX_FILE)
        manifest = bundle.manifest.model_copy(update={"index": index,
                                                      "files": dict(sorted(files.items()))})
        _write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        old = None
        if final.exists():  # replace: the old directory aside first (a rename cannot overwrite)
            old = final.parent / f".old-{final.name}-{secrets.token_hex(3)}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return _replace(bundle, manifest=manifest, path=final)


def write_bundle(
    models_dir: Path | str,
    version: str,
    *,
    write_index: Callable[[np.ndarray, Path], Mapping[str, Any]] | None,
    **model: Any,
) -> Path:
    """Create a model (`Bundle.create(version=version, **model)`) and save it as the new
    bundle `<models_dir>/<version>` (`save_bundle`); returns its directory. Does not make it
    current."""
    final = Path(models_dir) / check_version_name(version)
    save_bundle(Bundle.create(version=version, **model), final, write_index=write_index)
    return final


def drop_users(path: Path | str, users: Collection[str]) -> int:
    """Rewrite the bundle at `path` without `users` (their ids, factors and history; the
    user gram and checksums renewed); returns how many it held.

    In place, for the erasure: each user file is replaced atomically, the manifest last,
    so a reader in between fails the checksum and keeps the model it serves.
    """
    bundle = read_bundle(path)
    ids = bundle.user_ids
    drop = np.isin(ids, np.array(sorted(users), dtype=ids.dtype))
    if not drop.any():
        return 0
    keep = ~drop
    factors = np.ascontiguousarray(bundle.user_factors[keep])
    scrubbed = _replace(
        bundle, user_ids=ids[keep], user_factors=factors, user_gram=gramian(factors),
        user_items=sp.csr_matrix(bundle.user_items[keep], dtype=np.float32),
        manifest=bundle.manifest.model_copy(update={"n_users": int(keep.sum())}))
    directory = Path(path)
    arrays = scrubbed.arrays()
    files = dict(bundle.manifest.files)
    for name in USER_FILES:
        files[name] = _save_array(directory / name, arrays[name])
    _write_manifest(directory, scrubbed.manifest.model_copy(update={"files": files}))
    return int(drop.sum())


# -- reading -----------------------------------------------------------------------------
def read_manifest(path: Path | str) -> Manifest:
    """The typed manifest of the bundle at `path`; BundleError when missing or wrong."""
    path = Path(path)
    try:
        text = (path / MANIFEST).read_text()
    except FileNotFoundError as exc:
        raise BundleError(f"{path} has no {MANIFEST}") from exc
    return Manifest.parse(text, path / MANIFEST)


def verify_checksums(path: Path | str, manifest: Manifest) -> None:
    """Every file the bundle needs is listed, present and has its recorded sha256."""
    path = Path(path)
    needed = [*ARRAY_FILES, *([INDEX_FILE] if manifest.index is not None else [])]
    unlisted = [name for name in needed if name not in manifest.files]
    if unlisted:
        raise BundleError(f"{path}: the manifest lists no {', '.join(unlisted)}")
    for name, meta in manifest.files.items():
        p = path / name
        if not p.exists():
            raise BundleError(f"{path}: file {name} listed in the manifest is missing")
        if p.stat().st_size != meta.bytes or _sha256(p) != meta.sha256:
            raise BundleError(f"{path}: checksum mismatch for {name}")


def read_bundle(path: Path | str, *, verify: bool = True) -> Bundle:
    """Load a bundle, staged or published (memory-mapping nothing: it is validated in full
    before use). Raises BundleError naming what is wrong."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_checksums(path, manifest)

    def load(name: str) -> np.ndarray:
        return np.load(path / name, allow_pickle=False)

    try:
        with np.load(path / "user_items.npz", allow_pickle=False) as z:
            user_items = sp.csr_matrix(
                (z["data"], z["indices"], z["indptr"]),
                shape=(manifest.n_users, manifest.n_items))
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
        (bundle.user_ids.shape == (manifest.n_users,), "user_ids length"),
        (bundle.item_ids.shape == (manifest.n_items,), "item_ids length"),
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


def staged_user_ids(run: Path | str) -> np.ndarray | None:
    """The user ids a staged run's model holds (`<models_dir>/staging/<version>`), None when
    it holds no model. Reads the bundle's ids only, or a legacy `arrays.npz`."""
    run = Path(run)
    if (run / STAGED_BUNDLE / MANIFEST).exists():
        return np.load(run / STAGED_BUNDLE / "user_ids.npy", allow_pickle=False)
    if (run / LEGACY_STAGED_ARRAYS).exists():
        with np.load(run / LEGACY_STAGED_ARRAYS, allow_pickle=False) as z:
            return np.asarray(z["user_ids"])
    return None


def staged_mtime(run: Path | str) -> float | None:
    """When a staged run's model was written (epoch s), None when it holds none."""
    run = Path(run)
    for f in (run / STAGED_BUNDLE / MANIFEST, run / LEGACY_STAGED_ARRAYS):
        if f.exists():
            return f.stat().st_mtime
    return None


# -- versions and CURRENT ----------------------------------------------------------------
def list_versions(models_dir: Path | str) -> list[str]:
    """The published bundles' versions (not staged models, not temporary directories)."""
    d = Path(models_dir)
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists())


def current_version(models_dir: Path | str) -> str | None:
    try:
        v = (Path(models_dir) / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return v or None


def set_current(models_dir: Path | str, version: str) -> None:
    """Point CURRENT at `version` atomically (write temp file, fsync, rename)."""
    models_dir = Path(models_dir)
    check_version_name(version)
    # refuse to point at something that is not a published bundle
    if read_manifest(models_dir / version).index is None:
        raise BundleError(f"{models_dir / version} has no index: not a published bundle")
    tmp = models_dir / f".{CURRENT}.{secrets.token_hex(3)}"
    with tmp.open("w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, models_dir / CURRENT)
    _fsync_dir(models_dir)
