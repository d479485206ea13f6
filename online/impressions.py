"""Impressions: what each answer showed, recorded without making the answer wait.

Every Recommend, each RecommendBatch entry and each SimilarItems answer carries a
`recommendation_id` (`new_recommendation_id`: 128 random bits as hex), always. Of those the
sampling keeps (`impressions.sample_rate`, decided by `sampled`, a hash of the id, so
every replay and every reader agrees), `ImpressionRecorder.record` appends one tuple to an
in-memory list under a lock: no row building, no I/O on the request path.

A background thread (`impressions-writer`) takes the whole list every
`impressions.write_interval_ms` (sooner once `impressions.write_max` wait), builds the rows
and hands them to the ingest pipeline (`online.ingest.IngestPipeline`), which appends them
as ONE write-ahead-log record (`REC_IMPRESSIONS`) and fsyncs it from this thread (sharing
the group commit with IngestEvents). From there they reach `bronze_impressions` exactly
as events reach `bronze_events`: micro-batches under the node's own Delta app
transaction on that table, replay skipping what the table already holds.

Crash window (documented, by design): on kill -9 or power loss the impressions still in
the list (at most about `write_interval_ms` of answers) and those appended but not yet
fsynced (the group commit's few ms) are lost; every impression written before the last
fsync is in bronze exactly once after the restart. A graceful stop loses none (`close()`
writes the list and syncs before the pipeline's last flush).

Overload: beyond `impressions.max_buffered` waiting impressions, or when the lake flush is
too far behind (the pipeline's pending limit), new impressions are dropped and counted
(`dropped`): an answer is never refused or delayed for its impression.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake.config import ImpressionsSettings
from lake.schemas import BRONZE_IMPRESSIONS, IMPRESSION_ITEM, TS

log = logging.getLogger(__name__)

RECOMMEND, SIMILAR = "recommend", "similar"
"""`surface` values: which RPC showed the list."""
SIMILAR_STRATEGY = "similar"
"""The `strategy` of a SimilarItems impression."""

# One impression row (in the WAL and in memory): a JSON-friendly list in this order.
REC_ID, TENANT, SURFACE, USER_ID, ANCHOR, ITEM_IDS, SCORES, MODEL_VERSION, STRATEGY, \
    EXPERIMENT_ID, ARM, CONTEXT, TS_US = range(13)
ROW_FIELDS = ("recommendation_id", "tenant", "surface", "user_id", "anchor_item_id",
              "item_ids", "scores", "model_version", "strategy", "experiment_id", "arm",
              "context", "ts_us")
_ITEMS_TYPE = BRONZE_IMPRESSIONS.schema.field("items").type


def new_recommendation_id() -> str:
    """A unique, opaque answer id: 128 random bits as 32 hex characters."""
    return os.urandom(16).hex()


def sampled(recommendation_id: str, rate: float) -> bool:
    """Whether the answer with this id is recorded at sampling `rate`: the first 8 bytes
    of sha256(id) as a big-endian fraction of 2**64, below `rate`."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(recommendation_id.encode()).digest()[:8], "big")
    return h / 2**64 < rate


def context_json(filters: Any, context_item_ids: Sequence[str], surface: str) -> str:
    """The request context of an impression: `{"filters": {...}, "context_item_ids":
    [...]}` with empty lists left out (exclude_seen only for Recommend: SimilarItems
    ignores it)."""
    f: dict[str, Any] = {}
    if filters is not None:
        if surface == RECOMMEND:
            f["exclude_seen"] = bool(filters.exclude_seen)
        f["only_available"] = bool(filters.only_available)
        for name in ("exclude_item_ids", "include_categories", "exclude_categories"):
            values = getattr(filters, name)
            if values:
                f[name] = sorted(values)
    out: dict[str, Any] = {"filters": f}
    if context_item_ids:
        out["context_item_ids"] = list(context_item_ids)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _row(t: tuple[Any, ...]) -> list[Any]:
    """A recorded tuple (`ImpressionRecorder.record`'s arguments) as an impression row."""
    (rec_id, at, tenant, surface, user_id, anchor, items, model_version, strategy,
     experiment_id, arm, filters, context_items) = t
    return [rec_id, tenant, surface, user_id, anchor, [i[0] for i in items],
            [float(i[1]) for i in items], model_version, strategy, experiment_id, arm,
            context_json(filters, context_items, surface), int(at * 1_000_000)]


def encode_rows(rows: list[list[Any]]) -> bytes:
    """Impression rows as one WAL record's payload."""
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()


def decode_rows(payload: bytes) -> list[list[Any]]:
    """`encode_rows` reversed."""
    rows: list[list[Any]] = json.loads(payload)
    for r in rows:
        if len(r) != len(ROW_FIELDS):
            raise ValueError(f"impression row of {len(r)} fields, expected {len(ROW_FIELDS)}")
    return rows


def impressions_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Impression rows -> an Arrow table with the `bronze_impressions` schema (positions
    are the items' 0-based ranks)."""
    lengths = np.fromiter((len(r[ITEM_IDS]) for r in rows), np.int32, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = [i for r in rows for i in r[ITEM_IDS]]
    flat_scores = [s for r in rows for s in r[SCORES]]
    positions = np.arange(int(offsets[-1]), dtype=np.int32) - np.repeat(offsets[:-1], lengths)
    values = pa.StructArray.from_arrays(
        [pa.array(flat_ids, pa.string()), pa.array(positions, pa.int32()),
         pa.array(flat_scores, pa.float32())], fields=list(IMPRESSION_ITEM))
    items = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=_ITEMS_TYPE)
    ts = pa.array([r[TS_US] for r in rows], pa.int64()).cast(TS)

    def text(i: int) -> pa.Array:
        return pa.array([r[i] for r in rows], pa.string())

    cols = {
        "recommendation_id": text(REC_ID), "tenant": text(TENANT), "surface": text(SURFACE),
        "user_id": text(USER_ID), "anchor_item_id": text(ANCHOR), "items": items,
        "model_version": text(MODEL_VERSION), "strategy": text(STRATEGY),
        "experiment_id": text(EXPERIMENT_ID), "arm": text(ARM), "context": text(CONTEXT),
        "ts": ts, "impression_date": pc.cast(ts, pa.date32()),
    }
    return pa.table(cols, schema=BRONZE_IMPRESSIONS.schema)


class ImpressionRecorder:
    """The in-memory list and its background writer (see the module docstring).

    Args:
        settings: the `impressions.*` settings.
        sink: appends rows as one WAL record; returns its seq (0: dropped, overloaded).
            Raises when the log cannot take them.
        sync: makes the record with that seq durable (the WAL's group commit).
    """

    def __init__(self, settings: ImpressionsSettings, sink: Callable[[list[list[Any]]], int],
                 sync: Callable[[int], None]) -> None:
        self.rate = settings.sample_rate
        self.interval_s = settings.write_interval_ms / 1000.0
        self.write_max = settings.write_max
        self.max_buffered = settings.max_buffered
        self._sink = sink
        self._sync = sync
        self._buf: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()  # the list: held for an append or a swap only
        self._write_lock = threading.Lock()  # one writer: the thread, close(), drop_user()
        self._wake = threading.Event()  # the list stopped being empty
        self._full = threading.Event()  # the list reached write_max
        self._stop = False
        self._thread: threading.Thread | None = None
        self.recorded = 0
        """Impressions handed to the WAL."""
        self.dropped = 0
        """Sampled impressions never written (buffer full, lake behind, WAL failed)."""
        self.write_errors = 0

    # -- the request path ----------------------------------------------------------------
    def record(self, recommendation_id: str, tenant: str, surface: str, user_id: str | None,
               anchor_item_id: str | None, items: Sequence[Any], model_version: str,
               strategy: str, experiment_id: str, arm: str, filters: Any,
               context_item_ids: Sequence[str]) -> None:
        """Remember one answer (if sampled) for the writer; costs an append under a lock.

        `items` are (item_id, score, ...) tuples in rank order; `filters` the request's
        `online.recommender.FilterSpec` (None: none)."""
        rate = self.rate
        if rate < 1.0 and not sampled(recommendation_id, rate):
            return
        t = (recommendation_id, time.time(), tenant, surface, user_id, anchor_item_id, items,
             model_version, strategy, experiment_id, arm, filters, context_item_ids)
        with self._lock:
            buf = self._buf
            n = len(buf)
            if n >= self.max_buffered:
                self.dropped += 1
                return
            buf.append(t)
        if n == 0:
            self._wake.set()
        elif n + 1 == self.write_max:
            self._full.set()

    # -- the writer ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="impressions-writer",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            self._full.wait(self.interval_s)  # gather the answers of a few ms in one record
            self._full.clear()
            try:
                self.write_now()
            except Exception:  # noqa: BLE001 - counted in write_now; the thread goes on
                log.exception("impressions: WAL append failed; those impressions are lost")

    def write_now(self) -> int:
        """Append what waits as one WAL record and make it durable; returns how many."""
        with self._write_lock:
            with self._lock:
                batch, self._buf = self._buf, []
                self._full.clear()
            if not batch:
                return 0
            rows = [_row(t) for t in batch]
            try:
                seq = self._sink(rows)
            except Exception:
                self.dropped += len(rows)
                self.write_errors += 1
                raise
            if not seq:
                self.dropped += len(rows)
                return 0
        self._sync(seq)  # outside the lock: an erasure need not wait for the fsync
        self.recorded += len(rows)
        return len(rows)

    def drop_user(self, user_id: str) -> tuple[int, threading.Lock]:
        """Forget the waiting impressions of `user_id`. Returns how many, and the writer
        lock, held: the caller releases it once its tombstone is in the WAL, so nothing the
        user was shown before the erasure is written after it."""
        self._write_lock.acquire()
        with self._lock:
            keep = [t for t in self._buf if t[4] != user_id]
            removed = len(self._buf) - len(keep)
            self._buf = keep
        return removed, self._write_lock

    def close(self) -> None:
        """Stop the thread and write (and sync) what still waits."""
        self._stop = True
        self._wake.set()
        self._full.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.write_now()

    def pending(self) -> int:
        """Impressions waiting for the WAL."""
        return len(self._buf)
