"""Silver events held in memory as integer codes, for the tuning search and the evaluation.

Both need the *events*, not gold's aggregates: a per-user temporal holdout needs each
pair's first-touch time, and the search tries strength settings (value transform, decay)
that gold has already applied. `read_event_log` streams the lookback window of
`silver_events` through delta-rs (partition-pruned) into an `EventLog` of a few NumPy
columns (about 25 bytes an event), and `EventLog.matrix(params, keep)` turns any subset
of it into the user x item strength matrix with `lake.strength` — the same definition the
gold job applies in Spark and the online layer applies per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

from lake.strength import StrengthParams, epoch_micros, user_reference
from lake.tables import Lake
from lake.training_cut import end_of_day
from spark_jobs.cli import JobError

SILVER = "silver_events"
COLUMNS = ("user_id", "item_id", "event_type", "value", "ts")


@dataclass
class EventLog:
    """Events as codes into sorted id maps; one entry per event, time-ordered per user."""

    user_ids: np.ndarray
    """(n_users,) sorted str ids."""
    item_ids: np.ndarray
    """(n_items,) sorted str ids."""
    user: np.ndarray
    """(n_events,) int64 row into `user_ids`."""
    item: np.ndarray
    """(n_events,) int64 row into `item_ids`."""
    type_code: np.ndarray
    """(n_events,) row into `type_names`, the smallest unsigned int that holds it (not a
    str per event: 20M events of str took 0.8 GB, and every strength computation compared
    strings)."""
    type_names: np.ndarray
    """(n_types,) sorted str event types."""
    value: np.ndarray
    """(n_events,) float64, NaN where the event had no value."""
    ts: np.ndarray
    """(n_events,) float64 epoch seconds."""

    @property
    def n_events(self) -> int:
        return int(self.user.size)

    @property
    def event_type(self) -> np.ndarray:
        """(n_events,) str: each event's type name."""
        return self.type_names[self.type_code]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)

    def matrix(self, params: StrengthParams, keep: np.ndarray | None = None) -> sp.csr_matrix:
        """(n_users x n_items) strengths of the events in `keep` (bool mask; default all).

        The decay reference is each user's latest *kept* event, as the gold job and the
        online layer compute it from the events they have.
        """
        sel = np.ones(self.n_events, bool) if keep is None else np.asarray(keep, bool)
        u, i, ts = self.user[sel], self.item[sel], self.ts[sel]
        ref = user_reference(u, ts, self.shape[0])
        s = params.scores(self.type_code[sel], self.value[sel], ts, ref[u], self.type_names)
        pos = s > 0
        m = sp.csr_matrix((s[pos], (u[pos], i[pos])), shape=self.shape)
        m.sum_duplicates()
        m.data = params.cap(m.data)
        m.eliminate_zeros()
        m.sort_indices()
        return m

    def pair_first_touch(self, keep: np.ndarray | None = None
                         ) -> tuple[sp.csr_matrix, np.ndarray]:
        """The pairs of the events in `keep` (bool mask; default all).

        Returns the (n_users x n_items) first-touch time of each pair (seconds since the
        first event + 1, so that every stored entry is > 0) and, for each kept event in log
        order, the position of its pair among the matrix's stored entries.
        """
        sel = np.ones(self.n_events, bool) if keep is None else np.asarray(keep, bool)
        u, i, ts = self.user[sel], self.item[sel], self.ts[sel]
        if u.size == 0:
            return sp.csr_matrix(self.shape), np.empty(0, dtype=np.int64)
        t = ts - ts.min() + 1.0
        key = u * self.shape[1] + i
        # events are time-ordered per user (event_log_from_table), so a stable sort by pair
        # keeps each pair's events in time order: no second sort key needed
        order = np.argsort(key, kind="stable")
        first = np.ones(order.size, bool)
        first[1:] = key[order][1:] != key[order][:-1]
        o = order[first]
        # pairs in key order are the CSR's entries in storage order (rows, then columns)
        m = sp.csr_matrix((t[o], i[o], np.searchsorted(u[o], np.arange(self.shape[0] + 1))),
                          shape=self.shape)
        pair = np.empty(u.size, dtype=np.int64)
        pair[order] = np.cumsum(first) - 1
        return m, pair


@dataclass
class Holdout:
    """Test pairs of an `EventLog` and the events left for training."""

    test: sp.csr_matrix
    """(n_users x n_items) 1.0 for every held-out pair."""
    train_events: np.ndarray
    """(n_events,) bool: events of pairs that are not held out (and were candidates)."""
    info: dict[str, object]


def holdout(log: EventLog, protocol: str, test_fraction: float, min_items: int, seed: int,
            keep: np.ndarray | None = None) -> Holdout:
    """Hold out pairs of the events in `keep` (default all), per user.

    `user_time`: each user's last `test_fraction` of distinct items by first-touch time
    (`spark_jobs.splits.user_time_split`); `random`: that share at random. A held-out pair
    loses all its events from training, as in the reference protocol.
    """
    from spark_jobs.splits import random_split, user_time_split

    sel = np.ones(log.n_events, bool) if keep is None else np.asarray(keep, bool)
    first, pair = log.pair_first_touch(sel)
    if protocol == "user_time":
        split = user_time_split(first, test_fraction, min_items)
    elif protocol == "random":
        split = random_split(first, test_fraction, seed)
        split.test.data[:] = 1.0
    else:
        raise ValueError(f"unknown holdout protocol {protocol!r}; expected user_time or random")
    # `first` is canonical CSR, so the split's mask is over the very entries `pair` indexes
    in_test = np.zeros(log.n_events, bool)
    in_test[sel] = split.test_mask[pair]
    info = dict(split.info) | {
        "protocol": protocol,
        "test_pairs": int(split.test.nnz),
        "test_users": int(np.count_nonzero(np.diff(split.test.indptr))),
        "candidate_events": int(sel.sum()),
    }
    return Holdout(split.test.tocsr(), sel & ~in_test, info)


def read_event_log(lake: Lake, start: date, end: date, *, version: int | None = None,
                   event_types: list[str] | None = None) -> EventLog:
    """Silver events with `event_date` in [start, end] and `ts` before the end of `end`."""
    return event_log_from_table(silver_window(lake, start, end, version=version,
                                              event_types=event_types))


def silver_window(lake: Lake, start: date, end: date, *, version: int | None = None,
                  event_types: list[str] | None = None,
                  columns: tuple[str, ...] = COLUMNS) -> pa.Table:
    """`columns` of the silver events dated [start, end] with `ts` before the end of `end`,
    read with delta-rs (partition-pruned) at `version` (default the latest)."""
    lake.ensure(SILVER)
    dataset = lake.delta(SILVER, version).to_pyarrow_dataset()
    flt = ((ds.field("event_date") >= pa.scalar(start, pa.date32()))
           & (ds.field("event_date") <= pa.scalar(end, pa.date32()))
           & (ds.field("ts") < pa.scalar(end_of_day(end), pa.timestamp("us", tz="UTC"))))
    if event_types is not None:
        flt = flt & ds.field("event_type").isin(event_types)
    return dataset.to_table(columns=list(columns), filter=flt)


def lookback_log(lake: Lake, as_of: date, lookback_days: int) -> EventLog:
    """The events of the `lookback_days` window up to the end of `as_of` (never empty)."""
    log = read_event_log(lake, as_of - timedelta(days=lookback_days), as_of)
    if log.n_events == 0:
        raise JobError(f"silver_events has no events up to {as_of}; run compact first")
    return log


def silver_received_until(lake: Lake, start: date, end: date) -> datetime | None:
    """The latest `received_at` among silver events dated [start, end], from the Delta
    log's file statistics alone (no data read); None when there are none."""
    if not lake.exists(SILVER):
        return None
    actions = pa.table(lake.delta(SILVER).get_add_actions(flatten=True))
    if actions.num_rows == 0 or "max.received_at" not in actions.column_names:
        return None
    day = pc.cast(actions.column("partition.event_date"), pa.date32())
    keep = pc.and_(pc.greater_equal(day, pa.scalar(start, pa.date32())),
                   pc.less_equal(day, pa.scalar(end, pa.date32())))
    latest = pc.max(actions.column("max.received_at").filter(keep)).as_py()
    if latest is None:
        return None
    latest = latest if latest.tzinfo else latest.replace(tzinfo=UTC)
    # Delta file statistics keep timestamps truncated to the millisecond: the true latest
    # arrival lies within the next millisecond
    return latest + timedelta(microseconds=999)


def sorted_codes(ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(ids, return_inverse=True)` for an Arrow string column: the sorted distinct
    ids (str) and each row's index into them. Arrow hashes the rows and only the distinct
    ids are sorted (UTF-8 byte order is code-point order, as numpy sorts str): ~10x faster
    than numpy's sort of every row's string."""
    column = pc.cast(ids, pa.string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = column.dictionary_encode()
    if encoded.null_count:
        raise JobError(f"{encoded.null_count} events without an id or type (silver never "
                       "holds one: was the table written by compaction?)")
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    distinct = np.asarray(encoded.dictionary.take(order).to_numpy(zero_copy_only=False))
    return distinct.astype(str), codes


def user_time_order(user: np.ndarray, ts_us: np.ndarray, n_users: int) -> np.ndarray:
    """`np.lexsort((ts_us, user))`: rows by user, then time, ties in input order.

    One stable argsort of a single int64 key (user, microseconds since the first event)
    when it fits in 63 bits (30 days x 10^6 users does), which takes about half of
    lexsort's time at 20M rows; lexsort otherwise.
    """
    if ts_us.size == 0:
        return np.empty(0, np.int64)
    lo = int(ts_us.min())
    span = int(ts_us.max()) - lo + 1
    if n_users * span >= 2**63:
        return np.lexsort((ts_us, user))
    return np.argsort(user.astype(np.int64) * span + (ts_us - lo), kind="stable")


def event_log_from_table(table: pa.Table) -> EventLog:
    """An `EventLog` from an Arrow table with `user_id, item_id, event_type, value, ts`."""
    user_ids, u = sorted_codes(table.column("user_id"))
    item_ids, i = sorted_codes(table.column("item_id"))
    value = np.asarray(pc.fill_null(pc.cast(table.column("value"), pa.float64()), float("nan"))
                       .to_numpy(zero_copy_only=False), dtype=np.float64)
    ts_us = epoch_micros(table.column("ts")) if table.num_rows else np.empty(0, np.int64)
    ts = ts_us / 1e6  # epoch seconds
    type_names, types = sorted_codes(table.column("event_type"))
    order = user_time_order(u, ts_us, len(user_ids))
    code = types.astype(np.min_scalar_type(max(len(type_names) - 1, 0)))
    return EventLog(user_ids, item_ids, u[order], i[order], code[order], type_names,
                    value[order], ts[order])
