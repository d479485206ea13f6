"""Shared bench fixtures: big synthetic bundles (cached under var/bench/), a catalogue lake,
and the real gRPC server as a subprocess bound to 127.0.0.1.

A bundle is built straight from ALS-like factors (`bench.vectors` shape: clustered, norms
skewed like popularity) with `lake.bundle.write_bundle` and the serving index settings
(`IndexSettings()`: exact up to 50k items, HNSW above), so the server loads exactly what a
published model would give it. Building the 1M-item HNSW takes minutes on 2 cores, so the
bundle is cached by size and reused by later runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from bench.vectors import clustered_vectors
from lake.bundle import Manifest, read_manifest
from lake.config import PROJECT_ROOT, IndexSettings
from online.ports import free_port

CACHE_DIR = PROJECT_ROOT / "var" / "bench"
N_CLUSTERS = 200
N_CATEGORIES = 50
BUNDLE_VERSION = "vbench"


def scratch_dir(prefix: str) -> Path:
    """A new empty directory under `CACHE_DIR`, which is created first: on a fresh clone
    `var/bench` does not exist yet, and every section's scratch space lives there (the same
    disk as the lake and WAL they measure)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE_DIR))


def category_of_cluster(c: int | np.ndarray) -> np.ndarray | str:
    if isinstance(c, np.ndarray):
        return np.char.add("cat", (c % N_CATEGORIES).astype(str))
    return f"cat{int(c) % N_CATEGORIES}"


@dataclass
class BenchBundle:
    n_items: int
    n_users: int
    dim: int
    root: Path
    """`<root>/models/<version>` + `<root>/models/CURRENT`, `<root>/world.npz`."""

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def bundle_dir(self) -> Path:
        return self.models_dir / BUNDLE_VERSION

    def world(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "world.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def manifest(self) -> Manifest:
        return read_manifest(self.bundle_dir)


def ensure_bundle(n_items: int, *, n_users: int = 100_000, dim: int = 64,
                  log: bool = True) -> tuple[BenchBundle, float | None]:
    """The cached bundle for this size; builds it when missing. Returns (bundle, build s
    or None when it came from the cache)."""
    from lake.bundle import set_current, write_bundle
    from lake.foldin import FoldInParams
    from lake.vector_index import build_and_save

    root = CACHE_DIR / f"bundle-i{n_items}-u{n_users}-d{dim}"
    bb = BenchBundle(n_items, n_users, dim, root)
    if (bb.bundle_dir / "manifest.json").exists() and (root / "world.npz").exists():
        return bb, None
    if log:
        print(f"[bench] building bundle {n_items:,} items x {dim} (cached in {root})",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    items, item_cluster = clustered_vectors(n_items, dim)
    rng = np.random.default_rng(11)
    order = np.argsort(item_cluster, kind="stable")
    counts = np.bincount(item_cluster, minlength=N_CLUSTERS)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nonempty = np.flatnonzero(counts)
    p = counts[nonempty] / counts[nonempty].sum()
    user_cluster = rng.choice(nonempty, size=n_users, p=p).astype(np.int32)
    lens = rng.integers(3, 16, size=n_users)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    cl = np.repeat(user_cluster, lens)
    picks = starts[cl] + (rng.random(indptr[-1]) * counts[cl]).astype(np.int64)
    cols = order[picks].astype(np.int32)
    vals = rng.integers(1, 9, size=indptr[-1]).astype(np.float32)
    csr = sp.csr_matrix((vals, cols, indptr), shape=(n_users, n_items))
    csr.sum_duplicates()
    csr.sort_indices()
    # ALS-like user vectors: confidence-weighted mean of the history's item vectors.
    users = np.asarray(csr @ items) / np.maximum(1.0, np.asarray(csr.sum(axis=1)))
    users = users.astype(np.float32)
    popularity = np.asarray(csr.sum(axis=0)).ravel() + np.linalg.norm(items, axis=1)
    settings = IndexSettings()
    write_bundle(
        bb.models_dir, BUNDLE_VERSION,
        user_ids=np.char.add("u", np.arange(n_users).astype(str)),
        item_ids=np.char.add("i", np.arange(n_items).astype(str)),
        user_factors=users, item_factors=items, user_items=csr,
        item_popularity=popularity,
        foldin=FoldInParams.for_backend("implicit", alpha=2.0, regularization=30.0),
        backend="implicit", params={"factors": dim, "synthetic": True},
        write_index=lambda f, p: build_and_save(f, p, settings,
                                                recall_queries=f[rng.choice(len(f), 300)]),
    )
    set_current(bb.models_dir, BUNDLE_VERSION)
    np.savez(root / "world.npz", item_cluster=item_cluster, user_cluster=user_cluster)
    took = time.perf_counter() - t0
    if log:
        print(f"[bench] bundle {n_items:,} built in {took:.0f} s", file=sys.stderr, flush=True)
    return bb, took


def write_catalog(lake_root: Path, item_cluster: np.ndarray) -> None:
    """The `items` table the server's category filter reads (1% unavailable)."""
    import pyarrow as pa

    from lake.schemas import ITEMS
    from lake.tables import Lake

    n = len(item_cluster)
    rng = np.random.default_rng(5)
    now = datetime.now(UTC)
    table = pa.table({
        "item_id": pa.array(np.char.add("i", np.arange(n).astype(str))),
        "category": pa.array(category_of_cluster(item_cluster)),
        "price": pa.array(rng.uniform(1, 200, n)),
        "available": pa.array(rng.random(n) > 0.01),
        "title": pa.nulls(n, pa.string()),
        "updated_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    })
    table = table.cast(ITEMS.schema)
    Lake(lake_root).append("items", table)


@dataclass
class ServerProc:
    proc: subprocess.Popen
    target: str
    admin_target: str
    workdir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return int(self.proc.pid)


def thread_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra or {})
    return env


def wait_serving(target: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Until the server on `target` is SERVING; its log's tail in the error if it exits."""
    from online.fleet import FleetError
    from online.fleet import wait_serving as wait_health

    try:
        wait_health(target, timeout, proc, what="server")
    except FleetError as exc:
        raise RuntimeError(f"{exc}; log {log_path}:\n" + log_path.read_text()[-3000:]) from None


@contextmanager
def running_server(bb: BenchBundle, *, startup_timeout: float = 300.0,
                   workers: int | None = None,
                   env: dict[str, str] | None = None) -> Iterator[ServerProc]:
    """`python -m online.server` on a fresh tmp lake (catalogue) + WAL, serving `bb`;
    `env`: more settings (`LAMBDAREC__...` variables)."""
    extra = env
    work = scratch_dir("lambdarec-bench-")
    try:
        write_catalog(work / "lake", bb.world()["item_cluster"])
        port, admin = free_port(), free_port()
        env = thread_env({
            "LAMBDAREC__LAKE__ROOT": str(work / "lake"),
            "LAMBDAREC__MODEL__DIR": str(bb.models_dir),
            "LAMBDAREC__SERVER__WAL_DIR": str(work / "wal"),
            "LAMBDAREC__SERVER__HOST": "127.0.0.1",
            "LAMBDAREC__SERVER__PORT": str(port),
            "LAMBDAREC__SERVER__ADMIN_PORT": str(admin),
            "LAMBDAREC__SERVER__METRICS_PORT": "0",
            "LAMBDAREC__SERVER__RELOAD_POLL_S": "0",
        })
        if workers:
            env["LAMBDAREC__SERVER__WORKERS"] = str(workers)
        env.update(extra or {})
        log_path = work / "server.log"
        with log_path.open("wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "online.server"], cwd=PROJECT_ROOT,
                                    env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        sp_ = ServerProc(proc, f"127.0.0.1:{port}", f"127.0.0.1:{admin}", work, log_path)
        try:
            wait_serving(sp_.target, proc, startup_timeout, log_path)
            yield sp_
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def percentiles(lat_s: np.ndarray | list[float]) -> dict[str, float]:
    a = np.asarray(lat_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}
