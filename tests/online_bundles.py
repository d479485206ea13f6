"""Known-answer model bundles for the online tests (imported by tests/test_online_*.py).

Three orthogonal item clusters in an 8-d factor space: A* along e0, B* along e1, C* along
e2 (10 items each, norms 1.00, 0.99, ... so the in-cluster order is known). Users uA*,
uB*, uC* (3 each) have vectors along their cluster's axis and batch history on items
0 and 1 of it. Batch popularity: B3 > A7 > C1 > everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from lake.blend import BlendParams
from lake.bundle import set_current, write_bundle
from lake.config import IndexSettings
from lake.foldin import FoldInParams
from lake.training_cut import RECEIVED_UNTIL, TS_BEFORE, TrainingCut
from lake.vector_index import build_and_save

DIM = 8
CLUSTERS = {"A": 0, "B": 1, "C": 2}
PER_CLUSTER = 10
USERS_PER_CLUSTER = 3
TOP_POPULAR = ["B3", "A7", "C1"]
FOLDIN = FoldInParams.for_backend("implicit", alpha=1.0, regularization=0.1)


def cluster_items(c: str) -> list[str]:
    return [f"{c}{i}" for i in range(PER_CLUSTER)]


def build(models_dir: Path, version: str, *, shuffle_seed: int | None = None,
          make_current: bool = True, as_of: str | None = None,
          manifest: Mapping[str, Any] | None = None, metrics: dict | None = None,
          blend: BlendParams | None = None) -> Path:
    """Write the known bundle. `shuffle_seed` permutes item rows (same ids, new order);
    `manifest`: the training cut's manifest entries (`TrainingCut.to_manifest()`);
    `metrics`: the evaluation recorded in the manifest (default the flat
    `{"ndcg@10": 0.5}`); `blend`: the popularity blend its index is built for (default
    none)."""
    unknown = set(manifest or {}) - {TS_BEFORE, RECEIVED_UNTIL}
    if unknown:
        raise ValueError(f"online_bundles.build: manifest entries {sorted(unknown)} are not "
                         "the training cut's")
    item_ids, item_vecs = [], []
    for c, axis in CLUSTERS.items():
        for i in range(PER_CLUSTER):
            v = np.zeros(DIM, np.float32)
            v[axis] = 1.0 - 0.01 * i
            v[3 + axis] = 0.05  # small off-axis part, so no two items are parallel
            item_ids.append(f"{c}{i}")
            item_vecs.append(v)
    order = np.arange(len(item_ids))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(item_ids))
    item_ids = [item_ids[j] for j in order]
    item_factors = np.vstack([item_vecs[j] for j in order])
    row = {iid: j for j, iid in enumerate(item_ids)}

    user_ids, user_vecs, rows, cols, vals = [], [], [], [], []
    for c, axis in CLUSTERS.items():
        for u in range(USERS_PER_CLUSTER):
            uid = f"u{c}{u}"
            v = np.zeros(DIM, np.float32)
            v[axis] = 1.0
            user_ids.append(uid)
            user_vecs.append(v)
            for iid in (f"{c}0", f"{c}1"):
                rows.append(len(user_ids) - 1)
                cols.append(row[iid])
                vals.append(4.0)
    user_items = sp.csr_matrix((vals, (rows, cols)), shape=(len(user_ids), len(item_ids)))
    popularity = np.full(len(item_ids), 0.01)
    for rank, iid in enumerate(TOP_POPULAR):
        popularity[row[iid]] = 10.0 - rank
    path = write_bundle(
        models_dir, version,
        user_ids=np.array(user_ids), item_ids=np.array(item_ids),
        user_factors=np.vstack(user_vecs), item_factors=item_factors,
        user_items=user_items, item_popularity=popularity, foldin=FOLDIN,
        backend="implicit", params={"factors": DIM}, metrics=metrics or {"ndcg@10": 0.5},
        write_index=lambda f, p: build_and_save(f, p, IndexSettings()),
        as_of=date.fromisoformat(as_of) if as_of else None,
        cut=TrainingCut.from_manifest(manifest) if manifest else None, blend=blend,
    )
    if make_current:
        set_current(models_dir, version)
    return path


def corrupt(path: Path, name: str = "item_factors.npy") -> None:
    """Flip one byte near the end of a bundle file (the data, not the header)."""
    f = path / name
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
