"""One model bundle ready to serve: its FAISS index, id maps and popularity.

Immutable except for items added online (`LoadedModel.add_items`): they are appended to
the FAISS index (`.add`, no rebuild) and to the id maps, under the index's reader/writer
lock (`online.rwlock`), because FAISS does not allow `add` concurrently with `search`.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lake.blend import BlendParams, index_vectors, popularity_prior, query_vector
from lake.bundle import Bundle
from lake.vector_index import FaissIndex
from online.row_filters import RowFilterIndex, RowSelector, RowSubset
from online.rwlock import RWLock

_generations = itertools.count(1)


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
        self.cut = bundle.cut
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
        index = self.bundle.manifest.index
        return index.type if index is not None else type(self.index).__name__

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
    def user_query(self, vector: np.ndarray, n_history: int,
                   blend: BlendParams | None = None) -> np.ndarray:
        """The index query of a user vector: [x_u, w(n_u)] when blending (`lake.blend`).

        `blend` replaces the bundle's blend weights for this query (an experiment arm's
        `blend_weight`); only an index built with the prior column can take one."""
        if not self.blend.active:
            return vector
        return query_vector(vector, n_history, blend or self.blend)

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
            "backend": m.backend,
            "dim": self.dim,
            "n_users": len(self.user_row),
            "n_items": self.n_base_items,
            "online_items": self.online_items,
            "index_type": self.index_type,
            "created_at": m.created_at.isoformat(),
            "loaded_at": self.loaded_at.isoformat(),
            "metrics": m.metrics,
            "params": m.params,
        }
