"""The cross-replica channel: one Redis Stream every replica writes to and reads from.

The lake and each replica's WAL stay the truth. The stream only carries, to the other
replicas' memory, what one replica has already made durable and acknowledged:
- `e`: accepted events (after their WAL fsync; each with its tenant), tagged with the node
  id and WAL record seq;
- `i`: catalogue upserts (after the `items` merge);
- `f`: erasures (after the lake deletes).
A reader thread applies other nodes' entries through the same code as local requests
(`FleetApplier`), so there is one definition of "apply".

Redis down: ingest never waits for it. Publishing is a background thread with a bounded
buffer (`fleet.publish_buffer`) that is sent when Redis answers again; readers resume from
the last id they read. Meanwhile each replica serves its own writes (users keep their
affinity through the front door) and cross-replica freshness waits for Redis.

Start-up: a replica rebuilds its state from the lake (warm start, catalogue, erasures),
then replays the retained stream: events only where the lake snapshot it read did not yet
hold them (per node: WAL seq > that node's bronze app-transaction version), upserts and
erasures only if newer than its start (older ones are in the lake it loaded).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from lake.config import FleetSettings
from online.ingest import IngestPipeline, IngestResult

log = logging.getLogger(__name__)

EVENTS, ITEMS, FORGET = b"e", b"i", b"f"
RETRY_S = 0.5
READ_BLOCK_MS = 1000
APPLIED_MEMORY = 100_000  # per node: (node, seq) pairs remembered to skip a re-sent entry


class FleetApplier(Protocol):
    """What a replica does with a peer's entry: the same calls its own requests make."""

    def apply_events(self, events: Sequence[Mapping[str, Any]]) -> Any: ...

    def apply_items(self, items: Sequence[Mapping[str, Any]]) -> Any: ...

    def forget_user(self, user_id: str) -> Any: ...


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


def encode_events(events: Sequence[Mapping[str, Any]]) -> bytes:
    """The id, its tenant (which scopes it), the fields the online state folds in and the
    list the event came from (`recommendation_id`), as compact JSON (timestamps in µs)."""
    rows = [[e["event_id"], e["user_id"], e["item_id"], e["event_type"], e.get("value"),
             _micros(e["ts"]),
             _micros(e["received_at"]) if e.get("received_at") is not None else None,
             e.get("tenant") or "", e.get("recommendation_id") or ""]
            for e in events]
    return json.dumps(rows, separators=(",", ":")).encode()


def decode_events(data: bytes) -> list[dict[str, Any]]:
    """`encode_events` reversed; rows of a replica that predates tenants have tenant "",
    of one that predates recommendation ids recommendation_id ""."""
    out = []
    for row in json.loads(data):
        event_id, user, item, etype, value, ts, received = row[:7]
        out.append({"event_id": event_id, "user_id": user, "item_id": item,
                    "event_type": etype, "value": value,
                    "ts": datetime.fromtimestamp(ts / 1e6, UTC),
                    "received_at": None if received is None
                    else datetime.fromtimestamp(received / 1e6, UTC),
                    "tenant": row[7] if len(row) > 7 else "",
                    "recommendation_id": row[8] if len(row) > 8 else ""})
    return out


class FleetChannel:
    """Publishes this node's acknowledged changes and applies its peers'.

    Args:
        fleet: the `fleet.*` settings (`redis_url` must be set).
        node_id: this replica's ingest node id (entries it wrote are not applied twice).
        applier: where peers' entries go.
    """

    def __init__(self, fleet: FleetSettings, node_id: str, applier: FleetApplier) -> None:
        import redis

        if not fleet.redis_url:
            raise ValueError("fleet.redis_url: empty, the fleet channel needs a Redis URL")
        self.fleet = fleet
        self.node = node_id.encode()
        self.applier = applier
        # publishing never blocks ingest long: short timeouts, retried by the thread
        self._pub = redis.Redis.from_url(fleet.redis_url, socket_timeout=2.0,
                                         socket_connect_timeout=1.0)
        self._sub = redis.Redis.from_url(fleet.redis_url, socket_timeout=READ_BLOCK_MS / 1e3 + 5,
                                         socket_connect_timeout=1.0)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._queue: deque[dict[bytes, bytes]] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._floor: Callable[[str], int] = lambda node: 0
        self._floors: dict[bytes, int] = {}
        self._applied: dict[bytes, OrderedDict[int, None]] = {}
        self._start_ms = 0  # upserts / erasures older than this are in the loaded lake
        self._threads: list[threading.Thread] = []
        self.published = self.applied = self.skipped = self.dropped = self.apply_errors = 0
        self.connected = False
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, floor: Callable[[str], int], since_ms: int) -> None:
        """Start publishing and reading.

        Args:
            floor: `floor(node_id)` is that node's bronze app-transaction version in the
                lake snapshot this replica warm-started from (its events up to that WAL
                seq are already in our state).
            since_ms: when this replica began loading the catalogue and erasures from the
                lake (Unix ms; stream ids carry Redis' clock, so the clocks must agree):
                older upserts and erasures are in what it loaded.
        """
        self._floor = floor
        self._start_ms = since_ms
        for name, target in (("fleet-publish", self._publish_loop),
                             ("fleet-read", self._read_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, drain_s: float = 2.0) -> None:
        """Send what is buffered (for up to `drain_s` s), then stop both threads."""
        deadline = time.monotonic() + drain_s
        while self._queue and self.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=READ_BLOCK_MS / 1e3 + 6)
        self._pub.close()
        self._sub.close()

    # -- publishing ------------------------------------------------------------------------
    def publish_events(self, seq: int, events: Sequence[Mapping[str, Any]]) -> None:
        self._enqueue(EVENTS, encode_events(events), seq)

    def publish_items(self, items: Sequence[Mapping[str, Any]]) -> None:
        self._enqueue(ITEMS, json.dumps(list(items), separators=(",", ":")).encode(), 0)

    def publish_forget(self, user_id: str) -> None:
        self._enqueue(FORGET, user_id.encode(), 0)

    def _enqueue(self, kind: bytes, data: bytes, seq: int) -> None:
        entry = {b"n": self.node, b"k": kind, b"s": str(seq).encode(), b"d": data}
        with self._cond:
            if len(self._queue) >= self.fleet.publish_buffer:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.warning("fleet channel buffer full: %d message(s) dropped; peers see "
                                "them from the lake after their next restart or model",
                                self.dropped)
            self._queue.append(entry)
            self._cond.notify()

    def _publish_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                batch = [self._queue[i] for i in range(min(len(self._queue), 500))]
            try:
                pipe = self._pub.pipeline(transaction=False)
                for entry in batch:
                    pipe.xadd(self.fleet.stream, entry,  # type: ignore[arg-type]
                              maxlen=self.fleet.stream_maxlen, approximate=True)
                pipe.execute()
            except self._errors as exc:  # kept in the buffer, sent when Redis is back
                self._note_error(exc)
                self._stop.wait(RETRY_S)
                continue
            with self._cond:  # only this thread pops sent entries (overflow pops the oldest)
                for entry in batch:
                    if self._queue and self._queue[0] is entry:
                        self._queue.popleft()
            self.published += len(batch)
            self._mark_connected()

    # -- reading ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        last: bytes | str = "0-0"  # the retained stream first: see the module docstring
        while not self._stop.is_set():
            try:
                reply: Any = self._sub.xread({self.fleet.stream: last}, count=1000,
                                             block=READ_BLOCK_MS)
            except self._errors as exc:
                self._note_error(exc)
                self._stop.wait(RETRY_S)
                continue
            self._mark_connected()
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    self._handle(entry_id, fields)

    def _handle(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        node = fields.get(b"n", b"")
        if node == self.node:
            return
        kind, data = fields.get(b"k"), fields.get(b"d", b"")
        try:
            if kind == EVENTS:
                seq = int(fields.get(b"s", b"0"))
                if not self._first_time(node, seq):
                    self.skipped += 1
                    return
                self.applier.apply_events(decode_events(data))
            elif int(entry_id.split(b"-")[0]) < self._start_ms:
                self.skipped += 1  # in the lake this replica loaded at start
                return
            elif kind == ITEMS:
                self.applier.apply_items(json.loads(data))
            elif kind == FORGET:
                self.applier.forget_user(data.decode())
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except Exception:  # one bad entry must not stop the reader; counted and logged
            self.apply_errors += 1
            log.exception("fleet channel: could not apply entry %s from %s", entry_id, node)
            return
        self.applied += 1

    def _first_time(self, node: bytes, seq: int) -> bool:
        floor = self._floors.get(node)
        if floor is None:
            floor = self._floors[node] = self._floor(node.decode())
        if seq <= floor:
            return False
        seen = self._applied.setdefault(node, OrderedDict())
        if seq in seen:
            return False
        seen[seq] = None
        if len(seen) > APPLIED_MEMORY:
            seen.popitem(last=False)
        return True

    # -- state -----------------------------------------------------------------------------
    def _note_error(self, exc: BaseException) -> None:
        if self.connected or self.last_error is None:
            log.warning("fleet channel: Redis unreachable (%s); ingest goes on, peers catch "
                        "up when it is back", exc)
        self.connected = False
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _mark_connected(self) -> None:
        if not self.connected:
            log.info("fleet channel: Redis reachable")
        self.connected = True

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "published": self.published,
                "applied": self.applied, "skipped": self.skipped, "dropped": self.dropped,
                "buffered": len(self._queue), "apply_errors": self.apply_errors,
                "last_error": self.last_error}


class PublishingIngest:
    """An `IngestPipeline` whose acknowledged events and erasures also go to the peers.

    Wraps the pipeline the servicers call; everything else is the pipeline's own. Until
    `channel` is set (at server start, once the node id is claimed) nothing is published.
    """

    def __init__(self, inner: IngestPipeline) -> None:
        self.inner = inner
        self.channel: FleetChannel | None = None

    # -- the pipeline's own -------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.inner.node_id

    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def flush(self) -> int:
        return self.inner.flush()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    @property
    def impressions(self) -> Any:
        """The pipeline's impression recorder (impressions stay on this node: no peer
        serves from them)."""
        return self.inner.impressions

    # -- what the peers also get --------------------------------------------------------

    def attach(self, channel: FleetChannel) -> None:
        """Publish from now on, starting with what the WAL replay recovered: events a crash
        may have kept from the peers (those they already have are skipped by seq)."""
        for seq, events in self.inner.replayed:
            channel.publish_events(seq, events)
        self.inner.replayed.clear()  # in the channel's buffer now
        self.channel = channel

    def ingest(self, events: list[dict[str, Any]], *, tenant: str = "") -> IngestResult:
        result = self.inner.ingest(events, tenant=tenant)
        if result.accepted and self.channel is not None:  # durable in our WAL by now
            self.channel.publish_events(result.seq, result.accepted)
        return result

    def forget_user(self, user_id: str) -> dict[str, int]:
        counts: dict[str, int] = self.inner.forget_user(user_id)
        if self.channel is not None:
            self.channel.publish_forget(user_id)
        return counts


class ReplicaApplier:
    """Applies a peer's entry exactly as this replica applies its own requests."""

    def __init__(self, engine: Any, ingest: Any) -> None:
        self.engine = engine
        self.ingest = ingest  # the unwrapped pipeline: applying must not publish again

    def apply_events(self, events: Sequence[Mapping[str, Any]]) -> Any:
        # A client resending these ids here (its call to the peer failed) gets "duplicate":
        # the peer's WAL already brings them to bronze. Same tenant only, as locally.
        self.ingest.note_peer_events(events)
        return self.engine.apply_events(events)

    def apply_items(self, items: Sequence[Mapping[str, Any]]) -> Any:
        return self.engine.catalog.apply(items)

    def forget_user(self, user_id: str) -> Any:
        # Also our own WAL: events of that user we hold but have not flushed yet must not
        # reach bronze after the peer's deletes (the lake deletes repeat, idempotently).
        self.engine.forget_user(user_id)
        return self.ingest.forget_user(user_id)
