"""Bounds on the work one caller can make this server do.

* `RateLimits`: per access key, calls/s (every public call) and events/s (IngestEvents),
  counted with the `limits` library's sliding-window counter in this process' memory (each
  server of a fleet counts on its own). The budget is the call's tenant
  (`online.auth.caller_tenant`: the access key's name, so a rotated key keeps its
  budget). Calls without a key (an open loopback port, `make run`) and the console's own
  calls are not limited: there is no tenant to share the server with. Over a limit:
  `ResourceExhausted` with the time until the window has room again.
* `IngestGate`: at most `server.ingest_concurrency` IngestEvents calls are worked on at
  once, a few more wait briefly for a turn, the rest are refused at once. Validating and
  folding in a batch is Python work holding the GIL, so two ingest calls at once are not
  faster than one, and every extra one delays each GIL hand-over a Recommend call needs;
  the bound also keeps waiting ingest calls from taking all of gRPC's handler threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from lake.config import ServerSettings
from online.auth import caller_tenant
from online.errors import ResourceExhausted

MIN_RETRY_S = 0.001


class RateLimits:
    """Per-key calls/s and events/s over a one-second sliding window; 0 = no such limit."""

    def __init__(self, calls_per_s: int, events_per_s: int) -> None:
        self._storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._calls = RateLimitItemPerSecond(calls_per_s, namespace="calls") \
            if calls_per_s > 0 else None
        self._events = RateLimitItemPerSecond(events_per_s, namespace="events") \
            if events_per_s > 0 else None

    @classmethod
    def from_settings(cls, srv: ServerSettings) -> RateLimits | None:
        """The server's limits (None: both are off)."""
        if srv.rate_limit_calls_per_s <= 0 and srv.rate_limit_events_per_s <= 0:
            return None
        return cls(srv.rate_limit_calls_per_s, srv.rate_limit_events_per_s)

    @property
    def limits_calls(self) -> bool:
        return self._calls is not None

    def call(self, method: str) -> None:
        """Count one call of the current caller; raises `ResourceExhausted` over the limit."""
        if self._calls is not None:
            self._hit(self._calls, 1, f"{method}: calls", "server.rate_limit_calls_per_s")

    def events(self, n: int) -> None:
        """Count `n` events of the current caller; raises `ResourceExhausted` over the limit.

        A batch larger than the whole limit could never pass: `server.max_batch` above
        `server.rate_limit_events_per_s` is refused by the configuration.
        """
        if self._events is not None:
            self._hit(self._events, n, "IngestEvents: events", "server.rate_limit_events_per_s")

    def _hit(self, item: RateLimitItemPerSecond, cost: int, what: str, setting: str) -> None:
        who = caller_tenant()
        if not who:  # no key (an open loopback port) or the console: nobody to share with
            return
        if self._limiter.hit(item, who, cost=cost):
            return
        raise ResourceExhausted(f"{what} of access key {who!r} over {setting} "
                                f"({item.amount}/s; this call {cost})",
                                self._room_in(item, who, cost))

    def _room_in(self, item: RateLimitItemPerSecond, who: str, cost: int) -> float:
        """Seconds until the window has room for `cost` more, by the counter's arithmetic.

        The sliding-window counter weighs the previous window's count by the share of it
        still inside the sliding window: `prev * left / expiry + cur`, `left` being the time
        left in the current window. (`get_window_stats` gives the time until one
        unit is free, too early for a batch.)
        """
        expiry = item.get_expiry()
        prev, _, cur, cur_ttl = self._storage.get_sliding_window(item.key_for(who), expiry)
        left = cur_ttl - expiry  # of the current window (memory storage: ttl = left + expiry)
        room = item.amount - cost  # the weighted count this call needs at most
        if room < 0:  # never fits (the configuration keeps batches within the limit)
            wait = 2.0 * expiry
        elif cur <= room:  # within this window, as the previous one's weight shrinks
            excess = prev * left / expiry + cur - room  # > 0 only if prev > 0
            wait = excess * expiry / prev if excess > 0 else 0.0
        else:  # in the next window, where this window's count is the previous one
            wait = left + expiry * (1.0 - room / cur)
        return min(2.0 * expiry, max(MIN_RETRY_S, wait))


class IngestGate:
    """At most `concurrency` holders at once, at most `queue` more waiting up to `wait_s`.

    `concurrency` 0 disables the gate. The retry hint of a refusal is the time the calls
    ahead are expected to take (a moving average of how long a turn lasts).
    """

    def __init__(self, concurrency: int, queue: int, wait_s: float) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        self._lock = threading.Lock()
        self._waiting = 0
        self._turn_s = 0.05  # moving average of a turn, seeded with a small batch's time

    @property
    def waiting(self) -> int:
        """Calls waiting for a turn now."""
        with self._lock:
            return self._waiting

    @classmethod
    def from_settings(cls, srv: ServerSettings) -> IngestGate:
        # Waiting calls hold a handler thread each: leave at least one for everything else.
        queue = min(srv.ingest_queue, max(0, srv.workers - srv.ingest_concurrency - 1))
        return cls(srv.ingest_concurrency, queue, srv.ingest_wait_s)

    def _refuse(self, why: str, ahead: int) -> ResourceExhausted:
        with self._lock:
            turn = self._turn_s
        return ResourceExhausted(
            f"IngestEvents: {why} (server.ingest_concurrency {self.concurrency}, "
            f"server.ingest_queue {self.queue})",
            max(MIN_RETRY_S, turn * (ahead + 1) / self.concurrency))

    @contextmanager
    def turn(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold a turn for the block; `timeout_s` (the call's remaining deadline) caps the
        wait. Raises `ResourceExhausted` when the queue is full or the wait runs out."""
        if self.concurrency <= 0:
            yield
            return
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.queue:
                    ahead = self._waiting + self.concurrency
                    full = True
                else:
                    self._waiting += 1
                    full = False
            if full:
                raise self._refuse("too many ingest calls in progress", ahead)
            wait = self.wait_s if timeout_s is None else max(0.0, min(self.wait_s, timeout_s))
            try:
                got = self._slots.acquire(timeout=wait)
            finally:
                with self._lock:
                    self._waiting -= 1
                    ahead = self._waiting + self.concurrency
            if not got:
                raise self._refuse(f"no turn within {wait:.2g} s", ahead)
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0
            with self._lock:
                self._turn_s += 0.2 * (took - self._turn_s)
            self._slots.release()
