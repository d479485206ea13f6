"""Nearest-neighbour search over item factors behind one small interface.

Implementations: `ExactIndex` (numpy, the reference for recall) and `FaissIndex`
(exact IndexFlatIP or HNSW, CPU by default, GPU when faiss sees one and it is asked for).
All use inner product and address vectors by row number, so new items can be appended
online (`add`) without a rebuild.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lake.config import IndexSettings


class VectorIndex(Protocol):
    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores, row ids), both (n_queries, k); ids -1 when short."""
        ...

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; they get the next row ids."""
        ...


class ExactIndex:
    """Brute-force inner-product search: the ground truth other indexes are measured against."""

    def __init__(self, vectors: np.ndarray) -> None:
        self._v = np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def ntotal(self) -> int:
        return int(self._v.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        scores = q @ self._v.T
        k_eff = min(k, self.ntotal)
        ids = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff else np.empty(
            (q.shape[0], 0), dtype=np.int64)
        part = np.take_along_axis(scores, ids, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
        out_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
        out_s[:, :k_eff] = np.take_along_axis(part, order, axis=1)
        out_i[:, :k_eff] = ids
        return out_s, out_i

    def add(self, vectors: np.ndarray) -> None:
        self._v = np.vstack([self._v, np.asarray(vectors, dtype=np.float32)])


class FaissIndex:
    """A FAISS inner-product index (IndexFlatIP or IndexHNSWFlat)."""

    def __init__(self, index: Any) -> None:
        self._index = index

    @property
    def faiss_index(self) -> Any:
        return self._index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, ids = self._index.search(q, k)
        return scores, ids.astype(np.int64)

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32))

    def set_ef_search(self, ef: int) -> None:
        import faiss

        hnsw = faiss.downcast_index(self._index)
        if hasattr(hnsw, "hnsw"):
            hnsw.hnsw.efSearch = ef

    def save(self, path: Path) -> None:
        import faiss

        index = self._index
        if _is_gpu_index(index):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: Path, settings: IndexSettings | None = None) -> FaissIndex:
        import faiss

        index = faiss.read_index(str(path))
        idx = cls(_maybe_to_gpu(index, settings))
        if settings is not None:
            idx.set_ef_search(settings.hnsw_ef_search)
        return idx


def _is_gpu_index(index: Any) -> bool:
    return "Gpu" in type(index).__name__


def faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _maybe_to_gpu(index: Any, settings: IndexSettings | None) -> Any:
    want = settings.use_gpu if settings is not None else False
    if want is False or faiss_gpus() == 0:
        if want is True:
            raise RuntimeError("index.use_gpu is true but faiss sees no GPU")
        return index
    import faiss

    if not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return index  # HNSW has no GPU implementation; keep it on the CPU
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def build_faiss_index(vectors: np.ndarray, settings: IndexSettings) -> FaissIndex:
    """Exact IndexFlatIP up to `exact_max_items`, HNSW (inner product) above."""
    import faiss

    v = np.ascontiguousarray(vectors, dtype=np.float32)
    d = v.shape[1]
    index: Any
    if v.shape[0] <= settings.exact_max_items:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
    index.add(v)
    out = FaissIndex(_maybe_to_gpu(index, settings))
    out.set_ef_search(settings.hnsw_ef_search)
    return out


def recall_at_k(index: VectorIndex, exact: VectorIndex, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k that `index` also returns."""
    _, got = index.search(queries, k)
    _, want = exact.search(queries, k)
    hits = [len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, int((w >= 0).sum()))
            for g, w in zip(got, want, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def build_and_save(
    item_factors: np.ndarray,
    path: Path,
    settings: IndexSettings,
    *,
    recall_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the serving index, save it, and return manifest facts (type, recall@10 vs exact)."""
    t0 = time.perf_counter()
    index = build_faiss_index(item_factors, settings)
    build_s = time.perf_counter() - t0
    index.save(path)
    queries = recall_queries
    if queries is None:
        rng = np.random.default_rng(0)
        n = min(1000, item_factors.shape[0])
        queries = item_factors[rng.choice(item_factors.shape[0], size=n, replace=False)]
    recall = recall_at_k(index, ExactIndex(item_factors), queries, 10)
    kind = type(__import__("faiss").downcast_index(index.faiss_index)).__name__
    return {
        "type": kind,
        "ntotal": index.ntotal,
        "metric": "inner_product",
        "recall_at_10": round(recall, 4),
        "build_seconds": round(build_s, 3),
        "hnsw_m": settings.hnsw_m if "HNSW" in kind else None,
        "ef_search": settings.hnsw_ef_search if "HNSW" in kind else None,
    }
