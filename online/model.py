"""The serving model: a validated bundle, its FAISS index and id maps, swapped atomically.

`load_model()` does all the slow, failure-prone work (read + checksum every file, check
shapes, load the index and check it against the factors) so that a bad bundle is refused
before anything changes. `ModelManager.reload()` runs it off the request path, lets the
online state re-fold its users on the new factors, and then replaces one reference;
requests read `manager.current` once and finish on the model they started with.

Items unknown to the batch model can be added online (`LoadedModel.add_items`): they are
appended to the FAISS index (`.add`, no rebuild) and to the id maps. The index is guarded
by a reader/writer lock because FAISS does not allow `add` concurrently with `search`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lake.blend import index_vectors, popularity_prior, query_vector
from lake.bundle import Bundle, BundleError, check_version_name, current_version, read_bundle
from lake.config import IndexSettings, Settings
from lake.training_cut import TrainingCut, trained_from
from lake.vector_index import FaissIndex
from online.errors import ModelLoadError, NotFound

log = logging.getLogger(__name__)
_generations = itertools.count(1)


class RWLock:
    """Many readers or one writer; writers are not starved (new readers wait for them)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class RowSelector:
    """A FAISS search-time filter over item rows (IDSelectorBitmap + search parameters).

    Rows at or beyond `n` (items added after it was built) are outside the selector.
    Holds the bitmap: FAISS keeps only a pointer to it.
    """

    __slots__ = ("n", "bitmap", "selector", "params", "nbytes")

    def __init__(self, mask: np.ndarray, ef_search: int | None) -> None:
        import faiss

        self.n = int(mask.shape[0])
        self.bitmap = np.packbits(np.asarray(mask, dtype=bool), bitorder="little")
        self.nbytes = self.bitmap.nbytes
        # faiss takes the size of the bitmap in bytes (ids up to 8 x that are looked up)
        self.selector = faiss.IDSelectorBitmap(self.bitmap.size, faiss.swig_ptr(self.bitmap))
        if ef_search is not None:  # HNSW: parameters replace the index's efSearch
            # faiss's SWIG stubs lack these keyword constructors
            self.params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                sel=self.selector, efSearch=ef_search)
        else:
            self.params = faiss.SearchParameters(sel=self.selector)  # type: ignore[call-arg]


class RowSubset:
    """Exact inner-product search over the rows a selective filter admits (a category).

    The admitted factors are gathered once into their own IndexFlatIP, so the filter costs
    a scan of its own rows (20k x 64 in ~0.1 ms) instead of an HNSW walk through the whole
    catalogue that mostly visits rejected rows, and the answer is exact. Rows at or beyond
    `n` (items added after it was built) are outside it, as with `RowSelector`.
    """

    __slots__ = ("n", "rows", "index", "nbytes")

    def __init__(self, mask: np.ndarray, factors: np.ndarray) -> None:
        import faiss

        self.n = int(mask.shape[0])
        self.rows = np.flatnonzero(mask).astype(np.int64)
        sub = np.ascontiguousarray(factors[self.rows], dtype=np.float32)
        self.index = faiss.IndexFlatIP(factors.shape[1])
        self.index.add(sub)
        self.nbytes = sub.nbytes + self.rows.nbytes

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, model rows) of `query` (1 x d) among the subset's rows."""
        k = min(k, self.rows.size)
        if k == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        scores, local = self.index.search(query, k)
        return scores[0], self.rows[local[0]]


RowFilterIndex = RowSelector | RowSubset
"""What a cached filter searches with: a FAISS selector or an exact subset."""


class LoadedModel:
    """One bundle ready to serve. Immutable except for items added online."""

    def __init__(self, bundle: Bundle, index: FaissIndex, *, load_seconds: float = 0.0) -> None:
        self.bundle = bundle
        self.index = index
        self.generation = next(_generations)
        self.version = bundle.version
        self.dim = bundle.dim
        self.foldin = bundle.foldin
        self.loaded_at = datetime.now(UTC)
        self.load_seconds = load_seconds
        self.n_base_items = len(bundle.item_ids)
        self.item_ids: list[str] = bundle.item_ids.tolist()
        self.item_row: dict[str, int] = {iid: i for i, iid in enumerate(self.item_ids)}
        self.longest_item_id_bytes = max((len(i.encode()) for i in self.item_ids), default=0)
        """UTF-8 length of the longest item id (bounds the size of an answer)."""
        self.user_row: dict[str, int] = {uid: i for i, uid in enumerate(bundle.user_ids.tolist())}
        self._factors = np.ascontiguousarray(bundle.item_factors, dtype=np.float32)
        self.blend = bundle.blend
        self.strength = bundle.strength
        self.cut = TrainingCut.from_manifest(bundle.manifest)
        """The events the model was trained on (None: unknown; every event counts online)."""
        # What the index holds: the factors, plus the popularity prior when blending.
        self._index_vectors = (
            index_vectors(self._factors, popularity_prior(bundle.item_popularity))
            if self.blend.active else self._factors)
        pop = np.asarray(bundle.item_popularity, dtype=np.float64)
        top = float(pop.max()) if pop.size else 0.0
        self.popularity = pop / top if top > 0 else np.zeros_like(pop)
        self.popularity_order = np.argsort(-pop, kind="stable")
        self._lock = RWLock()
        self._add_lock = threading.Lock()
        self.forgotten: set[str] = set()

    # -- facts ------------------------------------------------------------------------
    @property
    def item_factors(self) -> np.ndarray:
        """Item factors including items added online (rows match `item_ids`)."""
        return self._factors

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def online_items(self) -> int:
        return self.n_items - self.n_base_items

    @property
    def index_type(self) -> str:
        return str(self.bundle.manifest.get("index", {}).get("type", type(self.index).__name__))

    # -- users ------------------------------------------------------------------------
    def user_history(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The batch interactions (item rows, raw strengths) the trainer saw for this user."""
        row = self.user_row.get(user_id)
        if row is None or user_id in self.forgotten:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        ui = self.bundle.user_items
        lo, hi = ui.indptr[row], ui.indptr[row + 1]
        return ui.indices[lo:hi].astype(np.int64), ui.data[lo:hi].astype(np.float64)

    def batch_user_vector(self, user_id: str) -> np.ndarray | None:
        row = self.user_row.get(user_id)
        if row is None or user_id in self.forgotten:
            return None
        return self.bundle.user_factors[row]

    # -- index ------------------------------------------------------------------------
    def user_query(self, vector: np.ndarray, n_history: int) -> np.ndarray:
        """The index query of a user vector: [x_u, w(n_u)] when blending (`lake.blend`)."""
        if not self.blend.active:
            return vector
        return query_vector(vector, n_history, self.blend)

    def item_query(self, row: int) -> np.ndarray:
        """The index query for items similar to `row`: its factors (prior weight 0)."""
        v = self._factors[row]
        return np.append(v, np.float32(0.0)) if self.blend.active else v

    def search(self, query: np.ndarray, k: int,
               selector: RowFilterIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product; with `selector`, only rows it admits."""
        k = max(1, min(k, self.n_items))
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if isinstance(selector, RowSubset):
            return selector.search(q, k)  # its own immutable index: no lock
        lock = self._lock
        lock.acquire_read()  # not `with lock.read()`: a generator per search costs more
        try:
            if selector is None:
                scores, rows = self.index.search(q, k)
            else:
                scores, rows = self.index.faiss_index.search(q, k, params=selector.params)
        finally:
            lock.release_read()
        return scores[0], rows[0]

    def selector(self, mask: np.ndarray, n_pass: int,
                 exact_max_rows: int = 0) -> RowFilterIndex | None:
        """A search-time filter admitting the rows where `mask` is True (`n_pass` of them):
        an exact subset when n_pass <= `exact_max_rows`, else a FAISS selector; None when
        the index cannot filter while searching (then callers filter the results)."""
        import faiss

        if n_pass <= exact_max_rows:
            return RowSubset(mask, self._index_vectors[: mask.shape[0]])
        index = getattr(self.index, "faiss_index", None)
        if index is None or "Gpu" in type(index).__name__:
            return None
        index = faiss.downcast_index(index)
        if isinstance(index, faiss.IndexHNSW):
            return RowSelector(mask, int(index.hnsw.efSearch))
        if isinstance(index, faiss.IndexFlat):
            return RowSelector(mask, None)
        return None

    def add_items(self, item_ids: list[str], vectors: np.ndarray) -> list[int]:
        """Append new items to the index and id maps; returns their rows.

        Items already known are skipped (their existing rows are returned).
        """
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        with self._add_lock:
            rows: list[int] = []
            new_ids: list[str] = []
            new_vecs: list[np.ndarray] = []
            for iid, v in zip(item_ids, vectors, strict=True):
                if iid in self.item_row:
                    rows.append(self.item_row[iid])
                    continue
                rows.append(self.n_items + len(new_ids))
                new_ids.append(iid)
                new_vecs.append(v)
            if not new_ids:
                return rows
            stacked = np.vstack(new_vecs)
            factors = np.vstack([self._factors, stacked])
            # an item new to the batch has no batch popularity: prior 0
            indexed = (index_vectors(stacked, np.zeros(len(stacked), np.float32))
                       if self.blend.active else stacked)
            all_indexed = np.vstack([self._index_vectors, indexed]) if self.blend.active \
                else factors
            with self._lock.write():
                self.index.add(indexed)
                if self.index.ntotal != factors.shape[0]:
                    raise RuntimeError("index and factor rows diverged while adding items")
                # Factors first, then ids, then the row map: a reader that finds the row
                # in item_row can always index item_ids and the factors with it.
                self._factors = factors
                self._index_vectors = all_indexed
                self.item_ids.extend(new_ids)
                self.longest_item_id_bytes = max(self.longest_item_id_bytes,
                                                 *(len(i.encode()) for i in new_ids))
                for j, iid in enumerate(new_ids):
                    self.item_row[iid] = self.n_items - len(new_ids) + j
        return rows

    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "version": self.version,
            "backend": m.get("backend", ""),
            "dim": self.dim,
            "n_users": len(self.user_row),
            "n_items": self.n_base_items,
            "online_items": self.online_items,
            "index_type": self.index_type,
            "created_at": m.get("created_at"),
            "loaded_at": self.loaded_at.isoformat(),
            "metrics": m.get("metrics", {}),
            "params": m.get("params", {}),
        }


def load_model(path: Path, index_settings: IndexSettings | None = None) -> LoadedModel:
    """Read and validate a bundle and its index. Raises ModelLoadError; changes nothing."""
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"model bundle {path} does not exist")
    try:
        bundle = read_bundle(path, verify=True)
    except BundleError as exc:
        raise ModelLoadError(f"model bundle refused: {exc}") from exc
    problems = []
    if len(set(bundle.item_ids.tolist())) != len(bundle.item_ids):
        problems.append("duplicate item ids")
    if len(set(bundle.user_ids.tolist())) != len(bundle.user_ids):
        problems.append("duplicate user ids")
    if bundle.user_items.shape != (len(bundle.user_ids), len(bundle.item_ids)):
        problems.append("user_items shape")
    if not np.all(np.isfinite(bundle.item_gram)):
        problems.append("non-finite item gram")
    if problems:
        raise ModelLoadError(f"model bundle refused: {path}: {', '.join(problems)}")
    try:
        index = FaissIndex.load(bundle.index_path, index_settings)
    except Exception as exc:  # faiss raises RuntimeError with its C++ message
        raise ModelLoadError(f"model bundle refused: {path}: cannot read index: {exc}") from exc
    d = int(getattr(index.faiss_index, "d", bundle.index_dim))
    if index.ntotal != len(bundle.item_ids) or d != bundle.index_dim:
        raise ModelLoadError(
            f"model bundle refused: {path}: index has {index.ntotal} vectors of dim {d}, "
            f"expected {len(bundle.item_ids)} of dim {bundle.index_dim}"
        )
    if len(bundle.item_ids):
        probe = bundle.item_factors[:1]
        if bundle.blend.active:
            probe = np.hstack([probe, np.zeros((1, 1), np.float32)])
        _, rows = index.search(probe, 1)
        if rows[0, 0] < 0:
            raise ModelLoadError(f"model bundle refused: {path}: index search returned nothing")
    return LoadedModel(bundle, index, load_seconds=time.perf_counter() - t0)


class ModelManager:
    """Holds the serving model; reloads are serialised and swap a single reference."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_new_model: Callable[[LoadedModel, LoadedModel | None], int] | None = None,
        on_swapped: Callable[[LoadedModel], None] | None = None,
    ) -> None:
        self.models_dir = Path(settings.model.dir)
        self.index_settings = settings.index
        self._current: LoadedModel | None = None
        self._reload_lock = threading.Lock()
        self._on_new_model = on_new_model
        self._on_swapped = on_swapped
        self.last_seen_current: str | None = None
        self._erased: dict[str, datetime] = {}
        self._swap_lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def reload(self, version: str | None = None) -> dict[str, Any]:
        """Load `version` (default: CURRENT), prepare it, swap it in. Old model on failure."""
        with self._reload_lock:
            pointer = current_version(self.models_dir)
            target = version or pointer
            if not target:
                raise NotFound(f"no model version given and {self.models_dir}/CURRENT is missing")
            if version is None:
                self.last_seen_current = pointer
            try:
                check_version_name(target)
            except BundleError as e:
                raise ModelLoadError(f"version: {e}") from None
            old = self._current
            if old is not None and old.version == target:
                return {"version": target, "previous": old.version, "changed": False,
                        "refolded_users": 0, "load_seconds": 0.0}
            t0 = time.perf_counter()
            new = load_model(self.models_dir / target, self.index_settings)
            refolded = self._on_new_model(new, old) if self._on_new_model else 0
            since = trained_from(new.bundle.manifest)
            with self._swap_lock:  # see forget(): an erasure lands in the old or the new model
                new.forgotten |= {u for u, at in self._erased.items()
                                  if since is None or at >= since}
                self._current = new  # the swap: one reference assignment
            seconds = time.perf_counter() - t0
            if self._on_swapped:
                self._on_swapped(new)
            log.info("model swapped", extra={"version": new.version,
                                             "previous": old.version if old else None,
                                             "refolded_users": refolded,
                                             "seconds": round(seconds, 3)})
            return {"version": new.version, "previous": old.version if old else "",
                    "changed": True, "refolded_users": refolded, "load_seconds": seconds}

    def forget(self, user_id: str) -> None:
        """Stop serving the user's batch vector, in the serving model and in every model
        trained before now that is swapped in later (also by a reload running right now)."""
        with self._swap_lock:
            self._erased[user_id] = datetime.now(UTC)
            model = self._current
            if model is not None:
                model.forgotten.add(user_id)

    def poll_once(self) -> dict[str, Any] | None:
        """Reload when the CURRENT pointer changed since we last looked; None otherwise."""
        pointer = current_version(self.models_dir)
        if pointer is None or pointer == self.last_seen_current:
            return None
        try:
            return self.reload(None)
        except Exception:
            self.last_seen_current = pointer  # do not retry a bad bundle every poll
            raise
