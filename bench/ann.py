"""ANN quality and speed: FAISS index recall@10 and latency vs exact search, per type and size."""

from __future__ import annotations

import time

import numpy as np

from bench.report import Report
from bench.vectors import als_like_vectors, user_like_queries
from lake.config import IndexSettings
from lake.vector_index import ExactIndex, build_faiss_index, recall_at_k


def _per_query_ms(index, queries: np.ndarray, k: int = 10) -> float:
    t0 = time.perf_counter()
    for q in queries:
        index.search(q[None, :], k)
    return (time.perf_counter() - t0) * 1000 / len(queries)


def run(report: Report, *, sizes: tuple[int, ...] = (20_000, 100_000, 1_000_000),
        dim: int = 64, n_queries: int = 300) -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # single-query serving setting (STACK.md)
    rows = []
    for n in sizes:
        items = als_like_vectors(n, dim)
        queries = user_like_queries(items, n_queries)
        exact = ExactIndex(items)
        t0 = time.perf_counter()
        flat = build_faiss_index(items, IndexSettings(exact_max_items=n))
        flat_build_s = time.perf_counter() - t0
        exact_ms = _per_query_ms(flat, queries)
        report.add(f"ann.flat.query_ms.n{n}", exact_ms, "ms/query", f"numpy exact n{n}",
                   _per_query_ms(exact, queries[:50]))
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        hnsw = build_faiss_index(items, IndexSettings(exact_max_items=1, hnsw_m=32,
                                                      hnsw_ef_construction=80))
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        report.add(f"ann.hnsw.build_s.n{n}", build_s, "s", f"IndexFlatIP build n{n}",
                   flat_build_s)
        for ef in (16, 64, 128, 256):
            hnsw.set_ef_search(ef)
            rec = recall_at_k(hnsw, flat, queries, 10)
            ms = _per_query_ms(hnsw, queries)
            report.add(f"ann.hnsw_ef{ef}.recall@10.n{n}", rec, "recall", "exact", 1.0)
            report.add(f"ann.hnsw_ef{ef}.query_ms.n{n}", ms, "ms/query",
                       f"faiss IndexFlatIP n{n}", exact_ms)
            rows.append((n, ef, rec, ms, exact_ms))
    report.note("ANN: FAISS HNSW vs exact", "\n".join(
        ["| items | efSearch | recall@10 | HNSW ms/query | exact ms/query | speed-up |",
         "|---:|---:|---:|---:|---:|---:|"]
        + [f"| {n} | {ef} | {r:.3f} | {ms:.3f} | {ex:.3f} | {ex / ms:.1f}x |"
           for n, ef, r, ms, ex in rows]))

    def draw(ax):
        for n in sizes:
            pts = [(r, ex / ms) for nn, _, r, ms, ex in rows if nn == n]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n:,} items")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("speed-up over exact IndexFlatIP")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("HNSW: recall vs speed-up (efSearch 16..256)")

    report.plot("ann_recall_speedup.png", "HNSW recall@10 vs speed-up over exact search", draw)
