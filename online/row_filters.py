"""Search-time filters over a model's item rows: a FAISS selector, or an exact subset.

A request's catalogue filters (availability, categories) become one of these once per
catalogue version (`online.recommender.Recommender._filter`), so the vector search itself
returns only rows that pass.
"""

from __future__ import annotations

import numpy as np


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
