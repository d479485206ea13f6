"""A compact memory of the event ids already committed to bronze, for idempotency across
restarts.

The WAL only remembers events it still holds; once they are in bronze and the WAL is
trimmed (always after a graceful stop) their ids would be forgotten, and a client that
re-sends an event after a restart would get it stored and applied twice. The ingest
pipeline therefore loads the ids bronze received within `server.dedupe_window_days` when
it starts and adds every id it commits.

Each id is kept as a 128-bit keyed BLAKE2b hash (the key is random per process: the index
is never persisted, and a client cannot craft an id that collides with someone else's),
18 bytes per id with its arrival day, instead of ~100 bytes for a Python string in a set.
Two different ids collide with probability ~ n * m / 2**128 (n ids held, m looked up):
no event is ever dropped as a false duplicate in practice.

Hashes live in sorted chunks merged like a log-structured tree (a chunk absorbs the next
one once that is at least half its size), so adding is amortised O(log n) per id and a
lookup is one binary search per chunk; ids older than the window drop out when their
chunk is merged or `expire()` runs.

Event ids are unique per tenant (the access key's name, `online.auth.caller_tenant`), not
globally: two shops may both send `order-1000`. What is held and looked up is therefore an
event's *scoped id* (`scoped_id`), the id itself for the tenant "" and `tenant NUL id`
otherwise (an id never holds a NUL: validation rejects control characters, so no two
(tenant, id) pairs share a scoped id).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_KEY = os.urandom(16)
_DAY_S = 86400
_SEP = "\x00"


def scoped_id(tenant: str, event_id: str) -> str:
    """The idempotency key of event `event_id` sent by `tenant` (see the module docstring)."""
    return f"{tenant}{_SEP}{event_id}" if tenant else event_id


def scoped_ids(tenants: pa.Array | pa.ChunkedArray,
               event_ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`scoped_id` over Arrow columns (a null tenant is "": rows written before tenants)."""
    tenants = pc.fill_null(tenants.cast(pa.string()), "")
    event_ids = event_ids.cast(pa.string())
    joined = pc.binary_join_element_wise(tenants, event_ids, _SEP)
    return pc.if_else(pc.equal(tenants, ""), event_ids, joined)


def id_hashes(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The two 64-bit halves of each id's keyed 128-bit hash (valid in this process only)."""
    values = ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else ids
    blake = hashlib.blake2b
    digests = b"".join(blake(v.encode(), digest_size=16, key=_KEY).digest() for v in values)
    both = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def day_of(t: datetime) -> int:
    return int(t.timestamp()) // _DAY_S


@dataclass
class _Chunk:
    h1: np.ndarray  # sorted
    h2: np.ndarray  # aligned with h1
    day: np.ndarray  # uint16 days since the epoch the id arrived, aligned with h1

    def __len__(self) -> int:
        return int(self.h1.size)

    def contains(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(self.h1, h1, side="left")
        hi = np.searchsorted(self.h1, h1, side="right")
        found = np.zeros(h1.size, dtype=bool)
        for i in np.flatnonzero(hi > lo):  # equal first halves: rare, compare the second
            found[i] = bool(np.any(self.h2[lo[i]:hi[i]] == h2[i]))
        return found


def _sorted_chunk(h1: np.ndarray, h2: np.ndarray, day: np.ndarray) -> _Chunk:
    order = np.argsort(h1, kind="stable")
    return _Chunk(h1[order], h2[order], day[order])


class CommittedIds:
    """Scoped event ids (`scoped_id`) committed within the last `window_days` (at least), as
    128-bit hashes."""

    def __init__(self, window_days: float) -> None:
        self.window_days = window_days
        self._chunks: list[_Chunk] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def nbytes(self) -> int:
        return sum(c.h1.nbytes + c.h2.nbytes + c.day.nbytes for c in self._chunks)

    def _horizon(self, now: datetime) -> int:
        return day_of(now) - int(np.ceil(self.window_days))

    def add(self, ids: Sequence[str] | pa.Array | pa.ChunkedArray,
            days: np.ndarray | None = None, *, now: datetime | None = None) -> None:
        """Remember `ids`, which arrived on `days` (days since the epoch; default today)."""
        h1, h2 = id_hashes(ids)
        if h1.size == 0:
            return
        now = now or datetime.now(UTC)
        if days is None:
            day = np.full(h1.size, day_of(now), dtype=np.uint16)
        else:
            day = np.asarray(days, dtype=np.uint16)
        chunk = _sorted_chunk(h1, h2, day)
        horizon = self._horizon(now)
        with self._lock:
            chunks = [*self._chunks, chunk]
            while len(chunks) > 1 and len(chunks[-2]) <= 2 * len(chunks[-1]):
                b, a = chunks.pop(), chunks.pop()
                chunks.append(self._merge(a, b, horizon))
            self._chunks = chunks

    @staticmethod
    def _merge(a: _Chunk, b: _Chunk, horizon: int) -> _Chunk:
        h1 = np.concatenate([a.h1, b.h1])
        h2 = np.concatenate([a.h2, b.h2])
        day = np.concatenate([a.day, b.day])
        keep = day >= horizon
        return _sorted_chunk(h1[keep], h2[keep], day[keep])

    def expire(self, now: datetime | None = None) -> int:
        """Drop ids that arrived before the window; returns how many were dropped."""
        horizon = self._horizon(now or datetime.now(UTC))
        with self._lock:
            before = len(self)
            kept = []
            for c in self._chunks:
                if c.day.size and int(c.day.min()) < horizon:
                    keep = c.day >= horizon
                    c = _Chunk(c.h1[keep], c.h2[keep], c.day[keep])
                if len(c):
                    kept.append(c)
            self._chunks = kept
            return before - len(self)

    def contains(self, ids: Sequence[str]) -> list[bool]:
        """For each id: was it committed within the window?"""
        chunks = self._chunks
        if not chunks or not ids:
            return [False] * len(ids)
        h1, h2 = id_hashes(ids)
        found = np.zeros(h1.size, dtype=bool)
        for c in chunks:
            found |= c.contains(h1, h2)
        return found.tolist()


def received_days(received_at: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrival timestamps (Arrow, UTC) as days since the epoch (uint16)."""
    micros = received_at.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    us_per_day = _DAY_S * 1_000_000
    return (np.asarray(micros.to_numpy(zero_copy_only=False)) // us_per_day).astype(np.uint16)
