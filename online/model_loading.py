"""Loading a bundle for serving: every slow, failure-prone check before anything changes.

`load_model()` reads and checksums every file, checks shapes and ids, loads the FAISS
index and checks it against the factors, so a bad bundle is refused (`ModelLoadError`,
one line) before the serving model is touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lake.bundle import BundleError, read_bundle
from lake.config import IndexSettings
from lake.vector_index import FaissIndex
from online.errors import ModelLoadError, NotFound
from online.loaded_model import LoadedModel


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
    if bundle.manifest.index is None:
        raise ModelLoadError(f"model bundle refused: {path}: it has no index "
                             "(a staged model: publish it first)")
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
