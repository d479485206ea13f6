"""Warm start: what a restarted server rebuilds its online state from (bronze).

While it runs, a server's online state holds the users seen most recently, at most
`server.max_online_users` of them and `server.max_online_events` events and seen items in
all, each with their latest events (`online.state`). A restart rebuilds the same state
from the bronze events the serving model was not trained on: the users whose latest event
arrived last, in arrival order, each with as many of their latest events as the state
could keep, until a cap is reached. So the replay is bounded by the caps, not by how many
users (made-up ids included) sent events since the last training; the users left out are
the ones the running server had dropped too, and the next model learns their events.

Real-time popularity counts every one of those events, as it did while the server ran:
summed per item in NumPy, one Python step per item.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake.strength import StrengthParams, epoch_seconds
from online.loaded_model import LoadedModel
from online.state import OnlineState, Popularity

ARRIVAL_ORDER = [("received_at", "ascending"), ("ts", "ascending")]


def latest_users(table: pa.Table, *, max_users: int, per_user: int, max_events: int) -> pa.Table:
    """The events of the users who sent the latest ones, in arrival order.

    Users are taken latest first (by their last arrival) while there are at most
    `max_users` of them and their kept events number at most `max_events` (the latest user
    is always taken); each keeps its latest `per_user` events by arrival. `table` needs
    `user_id`, `ts` and `received_at`.
    """
    n = table.num_rows
    if n == 0:
        return table
    order = pc.sort_indices(table, sort_keys=ARRIVAL_ORDER).to_numpy()
    users = pc.dictionary_encode(table.column("user_id").combine_chunks())
    codes = users.indices.to_numpy()[order]  # each event's user, in arrival order
    by_user = np.argsort(codes, kind="stable")  # grouped by user, arrival order within
    grouped = codes[by_user]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(grouped)) + 1])
    ends = np.append(starts[1:], n)
    sizes = ends - starts
    latest_first = np.repeat(ends, sizes) - 1 - np.arange(n)  # 0 = the user's latest event
    last_arrival = by_user[ends - 1]  # where each user's latest event is in arrival order
    by_recency = np.argsort(-last_arrival)
    spent = np.cumsum(np.minimum(sizes, per_user)[by_recency])
    n_users = min(max_users, max(1, int(np.searchsorted(spent, max_events, side="right"))))
    taken = np.zeros(sizes.size, dtype=bool)
    taken[by_recency[:n_users]] = True
    keep = (latest_first < per_user) & np.repeat(taken, sizes)
    return table.take(order[np.sort(by_user[keep])])


def replay(state: OnlineState, model: LoadedModel, table: pa.Table) -> int:
    """Add `table`'s events (bronze columns, in arrival order) to the users' online state,
    as `OnlineState.apply` would have (popularity aside); returns the users touched."""
    if table.num_rows == 0:
        return 0
    value = pc.fill_null(pc.cast(table.column("value"), pa.float64()), float("nan"))
    with collector_paused():
        return state.restore(
            model, table.column("user_id").to_pylist(), table.column("item_id").to_pylist(),
            table.column("event_type").to_pylist(),
            np.asarray(value.to_numpy(), np.float64).tolist(),
            epoch_seconds(table.column("ts")).tolist(),
            epoch_seconds(table.column("received_at")).tolist())


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a bulk build: the replay makes a few
    long-lived objects per event and no reference cycles, and the collector would walk the
    growing heap again and again (half the replay's time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def restore_popularity(popularity: Popularity, table: pa.Table, params: StrengthParams) -> None:
    """Count every event of `table` (`item_id`, `event_type`, `value`, `ts`) in the
    real-time popularity, weighted as `params` weighs it (as `OnlineState.apply` does)."""
    if table.num_rows == 0:
        return
    items = pc.dictionary_encode(table.column("item_id").combine_chunks())
    types = pc.dictionary_encode(table.column("event_type").combine_chunks())
    value = pc.fill_null(pc.cast(table.column("value"), pa.float64()), float("nan"))
    weights = params.base(types.indices.to_numpy(),
                          np.asarray(value.to_numpy(), np.float64),
                          type_names=np.asarray(types.dictionary.to_pylist()))
    popularity.add_many(items.dictionary.to_pylist(), items.indices.to_numpy(), weights,
                        epoch_seconds(table.column("ts")))
