"""Durable, de-duplicating, exactly-once event ingest: validate -> WAL (fsync) -> ack -> bronze.

`IngestPipeline` is what the gRPC `IngestEvents` handler calls. Its guarantees:

* **Durable acks.** `ingest()` returns only after the batch's WAL record is fsynced (group
  commit: concurrent callers share fsyncs, see `online.wal`). One ingest call is one WAL
  record, so a batch that was not acknowledged is either wholly in the log or not at all
  (a torn record fails its CRC and is truncated on restart).
* **Exactly once into bronze.** A background thread flushes durable records to the
  `bronze_events` Delta table in micro-batches (every `flush_interval_s`, or sooner once
  `flush_max_events` are pending). Each commit carries a Delta *application transaction*
  `(app_id="lambdarec-wal-<node_id>", version=<last WAL seq in the commit>)` in the same
  atomic commit as the data. On start, and before every flush, the pipeline reads
  `DeltaTable.transaction_version(app_id)` and skips WAL records at or below it, so a
  crash before, during or after a commit neither loses nor duplicates an event. Segments
  whose records are all committed are deleted.
* **De-duplication by (tenant, event_id)** within a batch and against every id that
  arrived within `server.dedupe_window_days`, across restarts. The tenant is the name of
  the access key the call used (`online.auth.caller_tenant`; "" without one): the same id
  from the same tenant is a duplicate, from another tenant a different event. Bronze records each
  event's tenant, and so does the WAL. Ids not yet in bronze live in the seen-set (an LRU
  bounded by `dedupe_max_ids` entries and `dedupe_ttl_s` seconds, rebuilt from the WAL
  after a restart); ids committed to bronze live in `CommittedIds` (128-bit hashes of the
  scoped ids, loaded from bronze's `received_at` window at start, extended by every
  flush). Older duplicates are removed by the silver compaction ("first arrival wins",
  per tenant). A duplicate of an event still being made durable by a concurrent call is
  acknowledged only once that event is durable.
* **Erasure.** `forget_user()` first writes a durable tombstone to the WAL and drops the
  user's pending events from memory, then deletes the user's rows from the lake tables.
  Replay applies tombstones to older pending records (so a crash can never resurrect
  them) and re-runs the lake deletes of tombstones not yet covered by a commit.

* **Impressions** (`online.impressions`) share the log: a second record type
  (`REC_IMPRESSIONS`) appended by the impression writer thread without any caller
  waiting, flushed with the events' micro-batches into `bronze_impressions` under the
  same app id *on that table*, which has its own version: replay skips, per record type,
  the records at or below its table's version. Sequence numbers stay one series for the
  whole log, so the log reopens above the larger of the two versions, and segments are
  released once every record in them is in its table. Erasure covers them too: waiting
  and pending impressions of the user are dropped with the tombstone, and
  `bronze_impressions` is one of the lake tables the user is deleted from.

Only one process may own a `wal_dir` (an flock guards it); give every server its own
`wal_dir` and `node_id`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from lake.config import Settings
from lake.erasure import USER_TABLES
from lake.schemas import (
    BRONZE_EVENTS,
    BRONZE_IMPRESSIONS,
    USER_ERASURES,
)
from lake.tables import Lake, sql_literal
from lake.validation import EventLimits, EventValidationError, validate_event
from online.committed_ids import CommittedIds, received_days, scoped_id, scoped_ids
from online.errors import Unavailable
from online.impressions import USER_ID as IMP_USER_ID
from online.impressions import (
    ImpressionRecorder,
    decode_rows,
    encode_rows,
    impressions_table,
)
from online.node_identity import NodeClaim, check_node_id
from online.wal import WALError, WriteAheadLog

log = logging.getLogger(__name__)

REC_EVENTS = 1
REC_FORGET = 2
REC_IMPRESSIONS = 3
BRONZE = BRONZE_EVENTS.name
IMPRESSIONS = BRONZE_IMPRESSIONS.name
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_WAL_FIELDS = ("event_id", "user_id", "item_id", "event_type", "value", "ts", "received_at",
               "session_id", "properties", "tenant", "recommendation_id")
"""One WAL event row, in this order. Older records end earlier: those written before
tenants after `properties` (they replay with the tenant ""), those written before
recommendation ids after `tenant` (recommendation_id "")."""


def event_key(ev: Mapping[str, Any]) -> str:
    """What de-duplicates an event: its id within its tenant (`scoped_id`)."""
    return scoped_id(ev.get("tenant") or "", ev["event_id"])


class IngestError(Unavailable):
    """Ingest cannot proceed (not started, closed, WAL failure): UNAVAILABLE to callers, who
    may retry (nothing of the call was acknowledged)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ingest unavailable: {message}")


class IngestOverloadedError(IngestError):
    """Too many events wait for the bronze flush (the lake is down or too slow): retry later."""


APP_PREFIX = "lambdarec-wal-"
"""A node's bronze app transaction is this prefix + its node id."""


@dataclass
class IngestResult:
    accepted: list[dict[str, Any]]
    """Normalised event dicts (bronze columns), durable in the WAL, in request order."""
    duplicates: int
    """Events whose event_id was seen before (in this batch or earlier); not re-appended."""
    rejected: list[tuple[int, str]]
    """(position in the request, reason naming the field) for each invalid event."""
    seq: int = 0
    """The WAL record holding `accepted` (0: none): with the node id, what replicas that
    receive the events through the fleet channel tell apart and skip once in bronze."""


@dataclass
class _Pending:
    seq: int
    events: list[Any]
    """Event dicts (`REC_EVENTS`) or impression rows (`REC_IMPRESSIONS`)."""
    received: float = field(default_factory=time.time)
    user_tombstone: str | None = None


class _Stream:
    """One record type's way from the WAL to its Delta table: the durable records not yet
    committed there, in seq order."""

    def __init__(self, table: str, to_table: Callable[[list[Any]], pa.Table],
                 user_of: Callable[[Any], str | None]) -> None:
        self.table = table
        self.to_table = to_table
        self.user_of = user_of
        self.pending: deque[_Pending] = deque()
        self.count = 0
        """Rows in `pending`."""
        self.committed_seq = 0
        """The last WAL seq committed to `table` (its app-transaction version)."""
        self.flushed_total = 0
        self.flush_commits = 0

    def drop_user(self, user_id: str) -> int:
        """Drop the user's pending rows; returns how many."""
        removed = 0
        user_of = self.user_of
        for rec in self.pending:
            keep = [r for r in rec.events if user_of(r) != user_id]
            removed += len(rec.events) - len(keep)
            rec.events = keep
        self.count -= removed
        return removed

    def clear(self) -> None:
        self.pending.clear()
        self.count = 0


def _to_us(ts: datetime) -> int:
    return (ts - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _wal_row(ev: dict[str, Any]) -> list[Any]:
    row = [ev[k] for k in _WAL_FIELDS]
    row[5] = _to_us(row[5])
    row[6] = _to_us(row[6])
    return row


def _encode_rows(rows: list[list[Any]]) -> bytes:
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()


def _decode_events(payload: bytes) -> list[dict[str, Any]]:
    out = []
    for row in json.loads(payload):
        if len(row) < len(_WAL_FIELDS):  # written before tenants / recommendation ids
            row = [*row, *[""] * (len(_WAL_FIELDS) - len(row))]
        ev = dict(zip(_WAL_FIELDS, row, strict=True))
        ev["ts"] = _from_us(ev["ts"])
        ev["received_at"] = _from_us(ev["received_at"])
        ev["event_date"] = ev["ts"].date()
        out.append(ev)
    return out


def events_table(events: list[dict[str, Any]]) -> pa.Table:
    """Normalised event dicts -> an Arrow table with the bronze schema."""
    schema = BRONZE_EVENTS.schema
    return pa.table({f.name: pa.array([e[f.name] for e in events], type=f.type)
                     for f in schema}, schema=schema)


class _SeenSet:
    """Scoped event id (`event_key`) -> WAL seq, LRU-bounded by size and age (first sight)."""

    def __init__(self, max_ids: int, ttl_s: float) -> None:
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self._d: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def get(self, event_id: str) -> int | None:
        hit = self._d.get(event_id)
        if hit is None:
            return None
        if time.monotonic() - hit[1] > self.ttl_s:
            return None
        return hit[0]

    def add(self, event_id: str, seq: int, now: float) -> None:
        self._d[event_id] = (seq, now)
        self._d.move_to_end(event_id)

    def trim(self, now: float) -> None:
        d = self._d
        while len(d) > self.max_ids:
            d.popitem(last=False)
        horizon = now - self.ttl_s
        while d:
            _, (_, t) = next(iter(d.items()))
            if t >= horizon:
                break
            d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class IngestPipeline:
    """Validate, de-duplicate, make durable, acknowledge; flush to bronze exactly once."""

    def __init__(
        self,
        settings: Settings,
        lake: Lake,
        *,
        node_id: str | None = None,
        dedupe_max_ids: int = 500_000,
        dedupe_ttl_s: float = 24 * 3600.0,
        segment_bytes: int = 16 * 1024 * 1024,
        max_pending_events: int | None = None,
    ) -> None:
        self.settings = settings
        self.server = settings.server
        self.lake = lake
        # None: `server.node_id`, else the id recorded in (or made for) the WAL directory.
        self._configured_node_id = node_id if node_id is not None else self.server.node_id
        if self._configured_node_id is not None:
            check_node_id(self._configured_node_id)
        self._claim: NodeClaim | None = None
        self._node_id: str | None = None
        self.segment_bytes = segment_bytes
        # Bronze enforces MAX_ID_LENGTH on append: never accept what a flush would reject.
        self.limits = EventLimits.from_settings(self.server)
        self.max_pending_events = max_pending_events or 20 * self.server.flush_max_events
        self._seen = _SeenSet(dedupe_max_ids, dedupe_ttl_s)
        self._committed_ids = CommittedIds(self.server.dedupe_window_days)
        self._ids_expired_at = time.monotonic()
        self.committed_ids_load_s = 0.0
        self._wal: WriteAheadLog | None = None
        # Events and tombstones (tombstones ride with the events: an events commit past
        # one says its deletes are done), and impressions: one stream per table.
        self._events = _Stream(BRONZE, events_table, lambda e: e["user_id"])
        self._imps = _Stream(IMPRESSIONS, impressions_table, lambda r: r[IMP_USER_ID])
        self.impressions = ImpressionRecorder(settings.impressions, self._log_impressions,
                                              self._sync_impressions)
        """What the servicers record each answer's impression with (`record`)."""
        self._ingest_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._covered_seq = 0
        """Every WAL record up to here is in its table (what the segments may be released
        up to)."""
        self.last_flush_time: float | None = None
        self.flush_errors = 0
        self.last_flush_error: str | None = None
        self.accepted_total = 0
        self.duplicates_total = 0
        self.rejected_total = 0
        self.replayed_events = 0
        self.replayed_impressions = 0
        self.replayed: list[tuple[int, list[dict[str, Any]]]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def _table_txn_version(self, table: str = BRONZE) -> int:
        path = str(self.lake.path(table))
        if not DeltaTable.is_deltatable(path):
            return 0
        v = DeltaTable(path).transaction_version(self.app_id)
        return int(v) if v is not None else 0

    def start(self) -> None:
        """Recover the WAL, commit what bronze lacks (exactly once), start the flusher."""
        if self._wal is not None or self._closed:
            raise IngestError("IngestPipeline.start() may be called once")
        if self._claim is None:
            self._claim = NodeClaim.acquire(self.server.wal_dir, self.lake.root,
                                            self._configured_node_id)
            self._node_id = self._claim.node_id
        committed = self._table_txn_version(BRONZE)
        committed_imp = self._table_txn_version(IMPRESSIONS)
        # One seq series for both tables: new records go above both versions (a log emptied
        # at a graceful stop must not reuse a seq either table holds), and records up to the
        # larger one may be gone (released once in their tables).
        wal = WriteAheadLog.open(
            self.server.wal_dir,
            fsync_interval_ms=self.server.wal_fsync_interval_ms,
            segment_bytes=self.segment_bytes,
            min_seq=max(committed, committed_imp) + 1,
        )
        for note in wal.truncated:
            log.warning("WAL recovery: %s", note)
        self._events.committed_seq = committed
        self._imps.committed_seq = committed_imp
        tombstones: list[str] = []
        now = time.monotonic()
        try:
            for rec in wal.replay():
                if rec.rtype == REC_EVENTS:
                    events = _decode_events(rec.payload)
                    for ev in events:
                        self._seen.add(event_key(ev), rec.seq, now)
                    if rec.seq > committed:
                        self._events.pending.append(_Pending(rec.seq, events))
                        self._events.count += len(events)
                elif rec.rtype == REC_IMPRESSIONS:
                    if rec.seq > committed_imp:
                        rows = decode_rows(rec.payload)
                        self._imps.pending.append(_Pending(rec.seq, rows))
                        self._imps.count += len(rows)
                elif rec.rtype == REC_FORGET:
                    user = json.loads(rec.payload)["user_id"]
                    if rec.seq > committed:
                        self._events.drop_user(user)
                        self._events.pending.append(_Pending(rec.seq, [], user_tombstone=user))
                    if rec.seq > committed_imp:
                        self._imps.drop_user(user)
                    # A commit to either table after the tombstone means its deletes were
                    # done: forget_user() holds the flush lock until they are.
                    if rec.seq > max(committed, committed_imp):
                        tombstones.append(user)
                else:
                    raise IngestError(f"WAL record {rec.seq} has unknown type {rec.rtype}")
            self._seen.trim(now)
            self._load_committed_ids()
            self.replayed_events = self._events.count
            self.replayed_impressions = self._imps.count
            # (seq, events) acknowledged before a crash, maybe never told to the peers
            self.replayed = [(p.seq, p.events) for p in self._events.pending if p.events]
            self._wal = wal
            # A tombstone not yet covered by a commit may not have reached the lake: redo its
            # deletes before flushing (later events of that user are still pending).
            for user in dict.fromkeys(tombstones):
                self._delete_user_rows(user)
            self.flush()
        except BaseException:  # leave nothing half-loaded: start() may be retried
            wal.close()
            self._release_claim()
            self._wal = None
            self._events.clear()
            self._imps.clear()
            self._seen = _SeenSet(self._seen.max_ids, self._seen.ttl_s)
            self._committed_ids = CommittedIds(self.server.dedupe_window_days)
            raise
        if self.replayed_events or self.replayed_impressions:
            log.info("WAL replay: %d event(s), %d impression(s) committed to bronze",
                     self.replayed_events, self.replayed_impressions)
        self._thread = threading.Thread(target=self._flush_loop, name="wal-flusher", daemon=True)
        self._thread.start()
        self.impressions.start()

    def _load_committed_ids(self) -> None:
        """Remember the (tenant, id) pairs bronze received within the dedupe window (from
        every writer)."""
        window = self.server.dedupe_window_days
        if window <= 0 or not self.lake.exists(BRONZE):
            return
        t0 = time.perf_counter()
        ts_type = pa.timestamp("us", tz="UTC")
        since = datetime.now(UTC) - timedelta(days=window)
        table = self.lake.read(BRONZE, columns=["event_id", "tenant", "received_at"],
                               filters=pc.field("received_at") >= pa.scalar(since, ts_type))
        self._committed_ids.add(scoped_ids(table.column("tenant"), table.column("event_id")),
                                received_days(table.column("received_at")))
        self.committed_ids_load_s = time.perf_counter() - t0
        log.info("dedupe window loaded: %d ids from bronze in %.2f s", table.num_rows,
                 self.committed_ids_load_s)

    def close(self) -> None:
        """Write the waiting impressions, stop the flusher, flush what is pending to the lake,
        fsync and release the WAL."""
        if self._closed:
            return
        wal = self._wal
        if wal is not None:
            try:
                self.impressions.close()  # into the WAL (synced) before the last flush
            except Exception:  # noqa: BLE001 - the events must still be flushed
                log.exception("impressions: the last write failed; they are lost")
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if wal is None:
            self._release_claim()
            return
        try:
            self.flush()
        finally:
            with self._ingest_lock:
                drained = not self._events.pending and not self._imps.pending \
                    and wal.last_seq <= self._covered_seq
            wal.close(delete_all=drained)
            self._release_claim()

    @property
    def flush_commits(self) -> int:
        """Commits to bronze_events so far (impressions: `stats()`)."""
        return self._events.flush_commits

    @property
    def flushed_total(self) -> int:
        """Events written to bronze_events so far."""
        return self._events.flushed_total

    @property
    def node_id(self) -> str:
        """This process's node id (known once `start()` has claimed it)."""
        if self._node_id is None:
            raise IngestError("the node id is claimed by IngestPipeline.start()")
        return self._node_id

    @property
    def app_id(self) -> str:
        """The Delta app transaction this node's WAL flushes under (on each table)."""
        return f"{APP_PREFIX}{self.node_id}"

    def _release_claim(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def __enter__(self) -> IngestPipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ingest ------------------------------------------------------------------------------
    def _require_open(self) -> WriteAheadLog:
        if self._wal is None:
            raise IngestError("IngestPipeline is not started")
        if self._closed:
            raise IngestError("IngestPipeline is closed")
        return self._wal

    def ingest(self, events: list[dict[str, Any]], *, tenant: str = "") -> IngestResult:
        """Validate, de-duplicate and durably log `events`; returns once they are fsynced.

        `tenant` (the caller's, `online.auth.caller_tenant`) scopes the event ids: an id this tenant
        sent before is a duplicate, the same id from another tenant is not. Invalid events
        are rejected one by one (the others are still accepted); the reason names the
        field. Raises ValueError for a batch above `max_batch`,
        IngestOverloadedError when the bronze flush is too far behind, IngestError when
        the pipeline is not running or the WAL failed (nothing was acknowledged then).
        """
        wal = self._require_open()
        if len(events) > self.server.max_batch:
            raise ValueError(f"batch of {len(events)} events exceeds max_batch "
                             f"{self.server.max_batch}")
        now = datetime.now(UTC)
        rejected: list[tuple[int, str]] = []
        valid: list[tuple[dict[str, Any], list[Any]]] = []
        for i, raw in enumerate(events):
            if not isinstance(raw, dict):
                rejected.append((i, f"row {i}: event must be a mapping, got {type(raw).__name__}"))
                continue
            try:
                ev = validate_event(i, raw, now=now, limits=self.limits)
            except EventValidationError as exc:
                rejected.append((i, str(exc)))
                continue
            ev["tenant"] = tenant
            valid.append((ev, _wal_row(ev)))
        keys = [event_key(ev) for ev, _ in valid]
        # Hashing outside the lock; an id committed meanwhile is still in the seen-set.
        in_bronze = self._committed_ids.contains(keys)
        # Encode optimistically outside the lock; re-encoded below only if duplicates drop out.
        encoded = _encode_rows([row for _, row in valid]) if valid else b""
        accepted: list[dict[str, Any]] = []
        duplicates = 0
        wait_seq = 0
        seq = 0
        stream = self._events
        with self._ingest_lock:
            if stream.count >= self.max_pending_events:
                raise IngestOverloadedError(
                    f"{stream.count} events wait for the bronze flush "
                    f"(limit {self.max_pending_events}); retry later")
            batch_ids: set[str] = set()
            rows: list[list[Any]] = []
            for (ev, row), eid, committed in zip(valid, keys, in_bronze, strict=True):
                if eid in batch_ids or committed:
                    duplicates += 1
                    continue
                prior = self._seen.get(eid)
                if prior is not None:
                    duplicates += 1
                    wait_seq = max(wait_seq, prior)
                    continue
                batch_ids.add(eid)
                accepted.append(ev)
                rows.append(row)
            if accepted:
                payload = encoded if len(rows) == len(valid) else _encode_rows(rows)
                try:
                    seq = wal.write(REC_EVENTS, payload)
                except WALError as exc:
                    raise IngestError(f"write-ahead log failed: {exc}") from exc
                mono = time.monotonic()
                for ev in accepted:
                    self._seen.add(event_key(ev), seq, mono)
                self._seen.trim(mono)
                stream.pending.append(_Pending(seq, accepted))
                stream.count += len(accepted)
                wait_seq = max(wait_seq, seq)
                if stream.count >= self.server.flush_max_events:
                    self._wake.set()
            self.accepted_total += len(accepted)
            self.duplicates_total += duplicates
            self.rejected_total += len(rejected)
        if wait_seq:
            try:
                wal.sync(wait_seq)
            except WALError as exc:
                raise IngestError(f"write-ahead log failed: {exc}") from exc
        return IngestResult(accepted=accepted, duplicates=duplicates, rejected=rejected,
                            seq=seq)

    def note_peer_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Events another replica acknowledged (durable in its WAL, bound for bronze): from
        now on a resend of one of them here (same tenant, same id) is a duplicate, as if
        bronze already held it."""
        self._committed_ids.add([event_key(e) for e in events])

    # -- impressions (called by the impression writer thread, `online.impressions`) ----------
    def _log_impressions(self, rows: list[list[Any]]) -> int:
        """Append impression rows as one WAL record (not yet durable); returns its seq, or
        0 when the lake flush is too far behind (the rows are dropped, never waited for)."""
        wal = self._require_open()
        payload = encode_rows(rows)
        stream = self._imps
        with self._ingest_lock:
            if stream.count >= self.max_pending_events:
                return 0  # counted as dropped by the recorder
            try:
                seq = wal.write(REC_IMPRESSIONS, payload)
            except WALError as exc:
                raise IngestError(f"write-ahead log failed: {exc}") from exc
            stream.pending.append(_Pending(seq, rows))
            stream.count += len(rows)
            if stream.count >= self.server.flush_max_events:
                self._wake.set()
        return seq

    def _sync_impressions(self, seq: int) -> None:
        wal = self._wal
        if wal is None:
            raise IngestError("IngestPipeline is not started")
        try:
            wal.sync(seq)
        except WALError as exc:
            raise IngestError(f"write-ahead log failed: {exc}") from exc

    # -- flushing ----------------------------------------------------------------------------
    def _flush_loop(self) -> None:
        interval = self.server.flush_interval_s
        last = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(timeout=max(0.0, interval - (time.monotonic() - last)))
            self._wake.clear()
            if self._stop.is_set():
                break
            # A wake-up during the previous flush may be stale: flush when either trigger
            # holds now, so micro-batches stay near flush_max_events under steady load.
            if (self._events.count < self.server.flush_max_events
                    and self._imps.count < self.server.flush_max_events
                    and time.monotonic() - last < interval):
                continue
            last = time.monotonic()
            try:
                self.flush()
            except Exception as exc:  # keep the records in the WAL and retry next interval
                self.flush_errors += 1
                self.last_flush_error = f"{type(exc).__name__}: {exc}"
                log.exception("flush to the lake failed; records stay in the WAL, will retry")
                self._stop.wait(interval)

    def flush(self) -> int:
        """Commit every durable pending event and impression to the lake now; returns how
        many events were written."""
        wal = self._wal
        if wal is None:
            raise IngestError("IngestPipeline is not started")
        with self._flush_lock:
            # Seal the segment being written first: once its records are in bronze this
            # flush deletes it, so an event's bytes leave the WAL with the flush that stores
            # it (an erased user's too, on every replica), not when the segment fills.
            try:
                wal.seal()
            except WALError as exc:
                raise IngestError(f"write-ahead log failed: {exc}") from exc
            durable = wal.synced_seq  # what arrives meanwhile waits for the next flush
            written = self._flush_stream(self._events, durable, self._events_committed)
            self._flush_stream(self._imps, durable)
            # Both streams hold nothing at or below `durable` now: every record up to it is
            # in its table.
            self._covered_seq = max(self._covered_seq, durable)
            wal.release_upto(self._covered_seq)
            if time.monotonic() - self._ids_expired_at > 3600.0:
                self._ids_expired_at = time.monotonic()
                self._committed_ids.expire()
        return written

    def _events_committed(self, batch: list[_Pending]) -> None:
        self._committed_ids.add([event_key(e) for r in batch for e in r.events])

    def _flush_stream(self, stream: _Stream, durable: int,
                      committed_hook: Callable[[list[_Pending]], None] | None = None) -> int:
        """Commit `stream`'s pending records up to `durable` to its table, in micro-batches
        of about `flush_max_events` rows, each with the app transaction of its last seq.
        Caller holds the flush lock. Returns the rows written."""
        written = 0
        while True:
            with self._ingest_lock:
                batch: list[_Pending] = []
                n = 0
                for rec in stream.pending:
                    if rec.seq > durable or (batch and n >= self.server.flush_max_events):
                        break
                    batch.append(rec)
                    n += len(rec.events)
            if not batch:
                return written
            last = batch[-1].seq
            # Ask the table, not our memory: a commit that raised may still have landed.
            committed = self._table_txn_version(stream.table)
            rows: list[Any] = []
            if committed < last:
                rows = [e for r in batch if r.seq > committed for e in r.events]
                self.lake.append(stream.table, stream.to_table(rows),
                                 app_transaction=(self.app_id, last))
                stream.flush_commits += 1
            with self._ingest_lock:
                for _ in batch:
                    stream.pending.popleft()
                # rows an erasure dropped meanwhile already left the count
                stream.count -= sum(len(r.events) for r in batch)
                stream.committed_seq = last
            if committed_hook is not None:
                committed_hook(batch)
            written += len(rows)
            stream.flushed_total += len(rows)
            self.last_flush_time = time.time()

    # -- erasure -----------------------------------------------------------------------------
    def _delete_user_rows(self, user_id: str) -> dict[str, int]:
        # Recorded first: every server hides the user's batch vector from then on, also
        # after a restart (a replayed tombstone may record it twice; readers take a set).
        self.lake.append(USER_ERASURES.name, pa.table({
            "user_id": [user_id], "requested_at": [datetime.now(UTC)]},
            schema=USER_ERASURES.schema))
        predicate = f"user_id = {sql_literal(user_id)}"
        counts: dict[str, int] = {}
        for name in USER_TABLES:
            metrics = self.lake.delete(name, predicate)
            counts[name] = int(metrics.get("num_deleted_rows", 0) or 0)
        return counts

    def forget_user(self, user_id: str) -> dict[str, int]:
        """Erase a user from pending WAL events and impressions and the lake tables; counts
        per table.

        The tombstone is durable before anything is deleted, so a crash part-way is
        finished by the next `start()`; the user's events ingested (and answers shown)
        after this call are kept.
        """
        wal = self._require_open()
        if not isinstance(user_id, str) or not user_id.strip():
            raise ValueError("user_id must be a non-empty string")
        with self._flush_lock:
            waiting, writer = self.impressions.drop_user(user_id)
            try:
                with self._ingest_lock:
                    seq = wal.write(REC_FORGET, json.dumps({"user_id": user_id}).encode())
                    removed = self._events.drop_user(user_id)
                    removed_imps = self._imps.drop_user(user_id)
                    self._events.pending.append(_Pending(seq, [], user_tombstone=user_id))
            except WALError as exc:
                raise IngestError(f"write-ahead log failed: {exc}") from exc
            finally:
                writer.release()  # impressions written from now on come after the tombstone
            try:
                wal.sync(seq)
            except WALError as exc:
                raise IngestError(f"write-ahead log failed: {exc}") from exc
            counts = self._delete_user_rows(user_id)
        # The WAL files still hold the user's acknowledged events and the tombstone: the
        # next flush (within server.flush_interval_s) deletes them (see flush()).
        counts["wal_pending"] = removed
        counts["impressions_pending"] = removed_imps + waiting
        return counts

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        wal = self._wal
        ev, imps = self._events, self._imps
        with self._ingest_lock:
            pending_events = ev.count
            pending_records = len(ev.pending)
            pending_impressions = imps.count
            oldest = min((s.pending[0].received for s in (ev, imps) if s.pending),
                         default=None)
            seen = len(self._seen)
        rec = self.impressions
        return {
            "pending_events": pending_events,
            "pending_records": pending_records,
            "last_flush_time": self.last_flush_time,
            "flushed_total": ev.flushed_total,
            "flush_commits": ev.flush_commits,
            "flush_errors": self.flush_errors,
            "last_flush_error": self.last_flush_error,
            "ingest_lag_s": (time.time() - oldest) if oldest is not None else 0.0,
            "wal_bytes": wal.size_bytes() if wal is not None else 0,
            "wal_segments": len(wal.segments()) if wal is not None else 0,
            "wal_fsyncs": wal.fsyncs if wal is not None else 0,
            "wal_last_seq": wal.last_seq if wal is not None else 0,
            "wal_durable_seq": wal.synced_seq if wal is not None else 0,
            "committed_seq": ev.committed_seq,
            "accepted_total": self.accepted_total,
            "duplicates_total": self.duplicates_total,
            "rejected_total": self.rejected_total,
            "replayed_events": self.replayed_events,
            "seen_ids": seen,
            "committed_ids": len(self._committed_ids),
            "committed_ids_bytes": self._committed_ids.nbytes(),
            "impressions_waiting": rec.pending(),
            "impressions_pending": pending_impressions,
            "impressions_recorded": rec.recorded,
            "impressions_dropped": rec.dropped,
            "impressions_flushed": imps.flushed_total,
            "impressions_flush_commits": imps.flush_commits,
            "impressions_committed_seq": imps.committed_seq,
            "replayed_impressions": self.replayed_impressions,
        }
