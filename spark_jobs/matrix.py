"""The user x item interaction matrix the trainers see, built from Arrow without Python loops.

`build_matrix(batches)` turns (user_id, item_id, confidence) record batches into dense id
maps (string id <-> row/column number, sorted so the same input always gives the same
numbering) and a CSR of confidences; duplicate (user, item) pairs are summed. Arrow's
`dictionary_encode`, `np.unique` and scipy do all the work, so millions of rows cost
seconds, not a Python object per row.

`read_gold(lake, as_of)` streams one as-of partition of `gold_interactions` from the lake
through delta-rs (partition-pruned dataset scan) — never the whole event log.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

from lake.tables import Lake

GOLD = "gold_interactions"
MATRIX_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "confidence")


@dataclass
class InteractionMatrix:
    """Dense id maps and the (n_users x n_items) CSR of interaction strengths."""

    user_ids: np.ndarray
    """(n_users,) sorted str ids; row i of `csr`."""
    item_ids: np.ndarray
    """(n_items,) sorted str ids; column j of `csr`."""
    csr: sp.csr_matrix

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids).astype(str)
        self.item_ids = np.asarray(self.item_ids).astype(str)
        self.csr = sp.csr_matrix(self.csr, dtype=np.float64)
        if self.csr.shape != (len(self.user_ids), len(self.item_ids)):
            raise ValueError(
                f"matrix shape {self.csr.shape} does not match "
                f"{len(self.user_ids)} users x {len(self.item_ids)} items"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.csr.shape  # type: ignore[return-value]

    @property
    def nnz(self) -> int:
        return int(self.csr.nnz)

    def user_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row numbers of `ids`; -1 where unknown."""
        return lookup_ids(self.user_ids, ids)

    def item_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Column numbers of `ids`; -1 where unknown."""
        return lookup_ids(self.item_ids, ids)

    def coo_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_index int32, item_index int32, value float64) of every stored entry."""
        coo = self.csr.tocoo()
        return coo.row.astype(np.int32), coo.col.astype(np.int32), coo.data.astype(np.float64)


def lookup_ids(sorted_ids: np.ndarray, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Positions of `ids` in the sorted id array `sorted_ids`; -1 where absent."""
    q = np.asarray(ids).astype(str)
    if len(sorted_ids) == 0:
        return np.full(q.shape, -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, q)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == q, pos, -1).astype(np.int64)


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(dictionary values as str array, int codes) of a string column."""
    enc = pc.dictionary_encode(col).combine_chunks()
    values = enc.dictionary.to_numpy(zero_copy_only=False).astype(str)
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return values, codes


def build_matrix(
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    value_column: str = "confidence",
) -> InteractionMatrix:
    """Build id maps + CSR from Arrow batches with `user_id`, `item_id`, `value_column`.

    Rows with a null id or a value <= 0 are dropped (no interaction); duplicates summed.
    """
    parts_u: list[np.ndarray] = []
    parts_i: list[np.ndarray] = []
    parts_v: list[np.ndarray] = []
    for b in batches:
        t = b if isinstance(b, pa.Table) else pa.Table.from_batches([b])
        if t.num_rows == 0:
            continue
        missing = {"user_id", "item_id", value_column} - set(t.column_names)
        if missing:
            raise ValueError(f"interaction batch lacks column(s) {sorted(missing)}")
        val = pc.cast(t.column(value_column), pa.float64())
        keep = pc.and_(
            pc.and_(pc.is_valid(t.column("user_id")), pc.is_valid(t.column("item_id"))),
            pc.fill_null(pc.greater(val, 0.0), False),
        )
        t = t.filter(keep)
        if t.num_rows == 0:
            continue
        # Per batch: encode ids to local codes, then keep only the (small) dictionaries.
        uvals, ucodes = _codes(pc.cast(t.column("user_id"), pa.string()))
        ivals, icodes = _codes(pc.cast(t.column("item_id"), pa.string()))
        parts_u.append(uvals[ucodes])
        parts_i.append(ivals[icodes])
        parts_v.append(pc.cast(t.column(value_column), pa.float64()).to_numpy())
    if not parts_u:
        return InteractionMatrix(np.array([], dtype=str), np.array([], dtype=str),
                                 sp.csr_matrix((0, 0)))
    users = np.concatenate(parts_u)
    items = np.concatenate(parts_i)
    values = np.concatenate(parts_v)
    user_ids, rows = np.unique(users, return_inverse=True)
    item_ids, cols = np.unique(items, return_inverse=True)
    csr = sp.csr_matrix(
        (values, (rows.astype(np.int64), cols.astype(np.int64))),
        shape=(len(user_ids), len(item_ids)),
    )
    csr.sum_duplicates()
    csr.sort_indices()
    return InteractionMatrix(user_ids, item_ids, csr)


def gold_dataset(lake: Lake, version: int | None = None) -> ds.Dataset:
    """The gold table's current (or `version`) snapshot as a lazily scanned Arrow dataset."""
    return lake.delta(GOLD, version).to_pyarrow_dataset()


def read_gold_batches(
    lake: Lake,
    as_of: date,
    *,
    columns: Sequence[str] = MATRIX_COLUMNS,
    extra_filter: ds.Expression | None = None,
    version: int | None = None,
    batch_size: int = 262_144,
) -> Iterator[pa.RecordBatch]:
    """Stream the rows of one `as_of` partition of gold (partition pruning by delta-rs)."""
    flt = ds.field("as_of") == pa.scalar(as_of, pa.date32())
    if extra_filter is not None:
        flt = flt & extra_filter
    scanner = gold_dataset(lake, version).scanner(
        columns=list(columns), filter=flt, batch_size=batch_size
    )
    yield from scanner.to_batches()


def read_gold(
    lake: Lake,
    as_of: date,
    *,
    version: int | None = None,
    extra_filter: ds.Expression | None = None,
) -> InteractionMatrix:
    """The interaction matrix of one as-of partition of gold."""
    return build_matrix(
        read_gold_batches(lake, as_of, version=version, extra_filter=extra_filter)
    )
