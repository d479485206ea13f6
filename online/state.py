"""Per-user online state: recent events, the folded-in vector, and real-time popularity.

A user's vector is `fold_in(item_factors, item_gram, batch history U recent events)`
(`lake.foldin`, the same solve the trainer uses). Folding is lazy: an event only bumps the
user's state version, and the next request that needs the vector computes it (so that
request already reflects the event: read-your-writes) and caches it per (model
generation, user state version); a request for a user with no new events does no linear
algebra, and a burst of events costs one fold-in, not one per ingest call. Items the
model does not know are remembered per user; once enough users with vectors touched one,
the item gets its own vector by the symmetric fold-in (against user vectors and XtX) and
joins the index.

Memory is bounded whatever ids clients send: at most `server.max_online_users` users and
`server.max_online_events` events and seen items in all; beyond either, the users seen least
recently are dropped. That loses nothing acknowledged: `online.ingest` made their events
durable (WAL, then bronze) before they reached this state, and never reads it, so they
reach the user through the next model, and the user's next event makes them online again.
A user costs a few hundred bytes: slotted objects, times as epoch-second floats, item ids
interned (one string per item, not one per event), the first seen items in a short list.

Concurrency: a user's events and seen items change only under the user's stripe lock (and
the users lock, which keeps the counts behind the caps exact); a request copies them under
the stripe lock once per state version (`Derived`) and works on the copy without locks.
"""

from __future__ import annotations

import heapq
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lake.config import Settings
from lake.foldin import fold_in
from lake.strength import StrengthParams
from lake.training_cut import TrainingCut
from online.loaded_model import LoadedModel

_STRIPES = 64
_SMALL_SEEN = 8
"""Seen items kept in a list up to this many (a dict costs ~120 bytes more for one item)."""
_NAN = float("nan")


def _epoch_s(t: datetime | None) -> float:
    return _NAN if t is None else t.timestamp()


@dataclass(slots=True)
class RecentEvent:
    item_id: str
    event_type: str
    ts_s: float
    """The event's `ts` in epoch seconds (a float orders like the datetime it came from,
    to the microsecond, and costs 24 bytes instead of a datetime's 48)."""
    value: float
    """The event's value (rating, count, quantity); NaN when it had none."""
    received_s: float
    """When the lake got it, in epoch seconds (decides whether a model's training saw it);
    NaN when unknown."""

    @property
    def ts(self) -> datetime:
        return datetime.fromtimestamp(self.ts_s, UTC)

    @property
    def received_at(self) -> datetime | None:
        if math.isnan(self.received_s):
            return None
        return datetime.fromtimestamp(self.received_s, UTC)


def _trained_on(cut: TrainingCut) -> Callable[[RecentEvent], bool]:
    """`cut.covers` on an event's epoch seconds (the same order as on the datetimes)."""
    before = cut.ts_before.timestamp()
    until = cut.received_until.timestamp() if cut.received_until is not None else None

    def covers(ev: RecentEvent) -> bool:
        if ev.ts_s >= before:
            return False
        return until is None or math.isnan(ev.received_s) or ev.received_s <= until

    return covers


@dataclass(slots=True)
class Derived:
    """What a user's real-time events give on one model at one state version (events
    decay from the user's latest one, so nothing else changes it)."""

    generation: int
    version: int
    recent: dict[int, float]
    """`OnlineState._aggregate`: what a request with a basket context adds its items to."""
    seen: frozenset[str]
    """The real-time seen item ids at `version`."""
    profile: tuple[np.ndarray | None, np.ndarray, np.ndarray] | None = None
    """(vector, rows, values) without a context, once a request has folded them in."""


@dataclass(slots=True)
class UserState:
    """One online user. `events` and `seen` change only under the user's stripe lock."""

    events: list[RecentEvent] = field(default_factory=list)
    """Oldest first, at most `server.recent_events_per_user`."""
    version: int = 0
    derived: Derived | None = None
    """What the events gave on the last model and state version a request saw."""
    seen: list[str] | dict[str, None] = field(default_factory=list)
    """Real-time seen item ids, oldest first, at most `server.seen_items_per_user` (a user
    streaming distinct items cannot grow it forever): a list while short, then a dict
    (which keeps insertion order)."""

    @property
    def size(self) -> int:
        """What the user counts against `server.max_online_events`."""
        return len(self.events) + len(self.seen)

    def add(self, ev: RecentEvent, seen: bool, recent_cap: int, seen_cap: int) -> None:
        events = self.events
        events.append(ev)
        if len(events) > recent_cap:
            del events[: len(events) - recent_cap]
        if seen:
            self._see(ev.item_id, seen_cap)
        self.version += 1

    def _see(self, item_id: str, cap: int) -> None:
        seen = self.seen
        if isinstance(seen, list):
            if item_id in seen:
                seen.remove(item_id)  # seen again: now the newest
            seen.append(item_id)
            if len(seen) > cap:
                del seen[0]
            if len(seen) > _SMALL_SEEN:
                self.seen = dict.fromkeys(seen)
            return
        seen.pop(item_id, None)
        seen[item_id] = None
        if len(seen) > cap:
            del seen[next(iter(seen))]


@dataclass
class UserProfile:
    """What a request needs about a user, resolved against one model."""

    vector: np.ndarray | None
    rows: np.ndarray
    """Item rows of the user's interactions (batch and real time), for seen/explanations."""
    values: np.ndarray
    seen_ids: Set[str]
    """Real-time seen items by id (includes items the model does not know yet)."""
    batch_rows: np.ndarray
    """Item rows of the user's batch history only (what the trainer saw)."""


class Popularity:
    """Exponentially decayed event counts per item (weight x 0.5 ** (age / half_life)),
    bounded to `max_items` items, with the `top_n` most popular maintained incrementally.

    Scores only grow (they are stored relative to a fixed epoch), so every item outside the
    kept top set scores at most `floor` -- the invariant that lets the fallback rank the
    top set alone. The top set holds up to 2 x top_n items and is cut back to top_n when
    it fills (amortised O(log n) per event); when more than `max_items` items have counts
    the least popular tenth is dropped (amortised O(1) per event).
    """

    def __init__(self, half_life_days: float, *, max_items: int = 100_000,
                 top_n: int = 1000) -> None:
        self._rate = math.log(2) / (half_life_days * 86400.0)
        self._t0 = time.time()
        self.max_items = max_items
        self.top_n = top_n
        self._scores: dict[str, float] = {}
        self._top: dict[str, float] = {}
        self._floor = 0.0
        self._max = 0.0
        self.longest_id_bytes = 0
        """UTF-8 length of the longest item id ever counted (bounds an answer's size)."""
        self._lock = threading.Lock()
        self._version = 0
        self._cache: tuple[int, tuple[list[tuple[str, float]], float]] = (0, ([], 0.0))

    def add(self, item_id: str, weight: float, ts: datetime) -> None:
        # Stored relative to a fixed epoch, so adding never touches the other items.
        exponent = (ts.timestamp() - self._t0) * self._rate
        v = weight * math.exp(min(exponent, 700.0))
        with self._lock:
            self._add_locked(item_id, v)
            self._version += 1

    def add_many(self, item_ids: Sequence[str], codes: np.ndarray, weights: np.ndarray,
                 ts_s: np.ndarray) -> None:
        """`add` for many events at once (the warm start): event j counts `weights[j]` at
        `ts_s[j]` (epoch seconds) for item `item_ids[codes[j]]`. One step per distinct
        item, not per event, and only the `max_items` items that gain most are added."""
        if len(codes) == 0:
            return
        exponent = np.minimum((np.asarray(ts_s, np.float64) - self._t0) * self._rate, 700.0)
        v = np.asarray(weights, np.float64) * np.exp(exponent)
        totals = np.bincount(np.asarray(codes, np.int64), weights=v, minlength=len(item_ids))
        gained = np.flatnonzero(totals > 0)
        if gained.size > self.max_items:
            gained = gained[np.argpartition(totals[gained], gained.size - self.max_items)
                            [gained.size - self.max_items:]]
        with self._lock:
            for j in gained.tolist():
                self._add_locked(item_ids[j], float(totals[j]))
            self._version += 1

    def _add_locked(self, item_id: str, v: float) -> None:
        old = self._scores.get(item_id)
        if old is None:
            self.longest_id_bytes = max(self.longest_id_bytes, len(item_id.encode()))
        score = (old or 0.0) + v
        self._scores[item_id] = score
        self._max = max(self._max, score)
        if item_id in self._top or score > self._floor or len(self._top) < self.top_n:
            self._top[item_id] = score
            if len(self._top) >= 2 * self.top_n:
                self._cut_top()
        if len(self._scores) > self.max_items:
            self._drop_least_popular()

    def _cut_top(self) -> None:
        kept = heapq.nlargest(self.top_n, self._top.items(), key=lambda kv: kv[1])
        self._top = dict(kept)
        self._floor = max(self._floor, kept[-1][1])

    def _drop_least_popular(self) -> None:
        keep = max(1, self.max_items - self.max_items // 10)
        items = list(self._scores.items())
        scores = np.fromiter((v for _, v in items), dtype=np.float64, count=len(items))
        kept = np.argpartition(scores, len(items) - keep)[len(items) - keep:]
        self._scores = dict(items[i] for i in kept.tolist())
        self._top = {k: v for k, v in self._top.items() if k in self._scores}

    @property
    def version(self) -> int:
        """Bumped by every `add`; lets callers cache what they derive from the scores."""
        return self._version

    def score(self, item_id: str) -> float:
        """The item's score scaled so the most popular item is 1.0 (0 when unknown)."""
        top = self._max
        return self._scores.get(item_id, 0.0) / top if top > 0 else 0.0

    def ranking(self) -> tuple[list[tuple[str, float]], float]:
        """(the top_n items by score, best first; a bound on every other item's score),
        scores scaled so the most popular item is 1.0. Cached until the next event; the
        returned list is shared: do not modify it."""
        cached = self._cache
        if cached[0] == self._version:
            return cached[1]
        with self._lock:
            version = self._version
            top_items = list(self._top.items())
            floor, top = self._floor, self._max
        if top <= 0:
            return [], 0.0
        best = heapq.nlargest(self.top_n, top_items, key=lambda kv: kv[1])
        if len(top_items) > self.top_n:
            floor = max(floor, best[-1][1])
        out = ([(k, v / top) for k, v in best], floor / top)
        self._cache = (version, out)
        return out

    def __len__(self) -> int:
        return len(self._scores)


class OnlineState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        srv = settings.server
        # The configured strength, for events that arrive while no model is loaded; a model
        # brings the settings it was trained with (`params`).
        self.strength = StrengthParams.from_settings(settings.interactions)
        self.recent_cap = srv.recent_events_per_user
        self.seen_types = set(srv.seen_event_types)
        self.seen_cap = srv.seen_items_per_user
        self.max_users = srv.max_online_users
        self.max_events = srv.max_online_events
        self.new_item_min = srv.new_item_min_interactions
        self.popularity = Popularity(srv.popularity_half_life_days,
                                     max_items=srv.popularity_max_items)
        self.max_pending_items = srv.max_pending_items
        self._users: OrderedDict[str, UserState] = OrderedDict()  # least recently seen first
        self._users_lock = threading.Lock()
        self._events_held = 0
        """Sum of the users' `size` (changed under `_users_lock`)."""
        self.evicted_users = 0
        """Users dropped for the caps since start."""
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # Items unknown to the serving model: item -> {user -> summed weight}.
        self._pending: dict[str, dict[str, float]] = {}
        self._pending_lock = threading.Lock()

    # -- bookkeeping -------------------------------------------------------------------
    def _stripe(self, user_id: str) -> threading.Lock:
        return self._stripes[hash(user_id) % _STRIPES]

    def __len__(self) -> int:
        return len(self._users)

    @property
    def events_held(self) -> int:
        """Events and seen items held across online users (`server.max_online_events`)."""
        return self._events_held

    def params(self, model: LoadedModel | None) -> StrengthParams:
        """The strength settings `model` was trained with (the configured ones without a
        model or for a bundle that does not record them)."""
        return model.strength if model is not None and model.strength else self.strength

    def users(self) -> list[str]:
        """Online users, least recently seen first."""
        with self._users_lock:
            return list(self._users)

    def get(self, user_id: str) -> UserState | None:
        return self._users.get(user_id)

    def recent_events(self, user_id: str) -> list[RecentEvent]:
        """A copy of the user's real-time events, oldest first (empty when not online)."""
        st = self._users.get(user_id)
        if st is None:
            return []
        with self._stripe(user_id):
            return list(st.events)

    def _add(self, user_id: str, ev: RecentEvent, seen: bool,
             evicted: list[tuple[str, UserState]]) -> None:
        """Record one event for the user (now the most recently seen) and drop the least
        recently seen users while over a cap (appended to `evicted`)."""
        users = self._users
        with self._users_lock:
            st = users.get(user_id)
            if st is None:
                st = users[user_id] = UserState()
            else:
                users.move_to_end(user_id)
            with self._stripe(user_id):
                before = st.size
                st.add(ev, seen, self.recent_cap, self.seen_cap)
                self._events_held += st.size - before
            # never the user just added: it is the newest, and one user always stays
            while len(users) > self.max_users or (
                    self._events_held > self.max_events and len(users) > 1):
                uid, old = users.popitem(last=False)
                self._events_held -= old.size  # it changes only under this lock
                self.evicted_users += 1
                evicted.append((uid, old))

    def _drop_pending_of(self, evicted: list[tuple[str, UserState]]) -> None:
        """Forget what evicted users gave items unknown to the model (a made-up user on an
        unknown item would otherwise stay there after leaving the state)."""
        with self._pending_lock:
            for uid, st in evicted:
                if uid in self._users:  # back already, with a new event
                    continue
                for ev in st.events:
                    fans = self._pending.get(ev.item_id)
                    if fans is not None and fans.pop(uid, None) is not None and not fans:
                        del self._pending[ev.item_id]

    def forget(self, user_id: str) -> bool:
        with self._users_lock:
            st = self._users.pop(user_id, None)
            if st is not None:
                self._events_held -= st.size
        with self._pending_lock:
            for users in self._pending.values():
                users.pop(user_id, None)
        return st is not None

    # -- events ------------------------------------------------------------------------
    def apply(
        self, model: LoadedModel | None, events: Iterable[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Fold accepted (normalised) events into user state; returns what changed.

        Events are weighted with the model's strength settings (`params`), as its fold-in
        weighs them.

        Returns {"users": [...touched], "new_items": [...added to the index], "lags": [...]}.
        """
        now_s = time.time()
        events = list(events)
        times: list[datetime] = [e["ts"] for e in events]
        ts_s = [t.timestamp() for t in times]
        touched, unknown = self._record(
            model, [e["user_id"] for e in events], [e["item_id"] for e in events],
            [e["event_type"] for e in events],
            [_NAN if e.get("value") is None else float(e["value"]) for e in events],
            ts_s, [_epoch_s(e.get("received_at")) for e in events], times)
        new_items: list[str] = []
        if model is not None:  # touched users fold in lazily, at their next request
            new_items = self.fold_new_items(model, unknown)
        return {"users": touched, "new_items": new_items,
                "lags": [max(0.0, now_s - t) for t in ts_s]}

    def restore(self, model: LoadedModel, user_ids: Sequence[str], item_ids: Sequence[str],
                event_types: Sequence[str], values: Sequence[float], ts_s: Sequence[float],
                received_s: Sequence[float]) -> int:
        """The warm start's replay: `apply` for events given as columns (oldest arrival
        first; times in epoch seconds, NaN = no value), leaving the real-time popularity
        alone (the warm start counts it for every event at once). Returns the users
        touched."""
        touched, unknown = self._record(model, user_ids, item_ids, event_types, values, ts_s,
                                        received_s, None)
        self.fold_new_items(model, unknown)
        return len(touched)

    def _record(self, model: LoadedModel | None, user_ids: Sequence[str],
                item_ids: Sequence[str], event_types: Sequence[str], values: Sequence[float],
                ts_s: Sequence[float], received_s: Sequence[float],
                times: Sequence[datetime] | None) -> tuple[list[str], list[str]]:
        """Add the events (columns) to their users, to the items unknown to the model and,
        with their `times`, to popularity. Returns (users touched, unknown items touched)."""
        # one vectorised call for the batch, not one per event (this is the ingest path)
        weights = self.params(model).base(np.array(event_types),
                                          np.array(values, dtype=np.float64)).tolist()
        touched: dict[str, None] = {}
        unknown: dict[str, None] = {}
        evicted: list[tuple[str, UserState]] = []
        intern = sys.intern  # one string per item and type, shared by every user's events
        seen_types = self.seen_types
        known = model.item_row if model is not None else None
        for j, (user_id, item_id, etype, value, t, received, w) in enumerate(zip(
                user_ids, item_ids, event_types, values, ts_s, received_s, weights,
                strict=True)):
            item_id, etype = intern(item_id), intern(etype)
            if value != value:  # NaN: no value; one shared float, not one per event
                value = _NAN
            self._add(user_id, RecentEvent(item_id, etype, t, value, received),
                      etype in seen_types, evicted)
            touched[user_id] = None
            if w > 0:
                if times is not None:
                    self.popularity.add(item_id, w, times[j])
                if known is None or item_id not in known:
                    with self._pending_lock:
                        users = self._pending.setdefault(item_id, {})
                        users[user_id] = users.get(user_id, 0.0) + w
                        if len(self._pending) > self.max_pending_items:
                            self._drop_least_followed_pending()
                    unknown[item_id] = None
        if evicted:
            self._drop_pending_of(evicted)
        return list(touched), list(unknown)

    def _aggregate(self, events: Sequence[RecentEvent], model: LoadedModel) -> dict[int, float]:
        """Recent events as {item row: summed strength} for items the model knows.

        The strength is `lake.strength` with the model's own settings, decayed from the
        user's latest real-time event (the batch decayed from the latest event it saw), so
        a user whose history arrives only online gets what the trainer would have given
        them for the same events.
        """
        cut = model.cut
        if cut is not None:  # what the batch history already holds counts once
            covers = _trained_on(cut)
            events = [ev for ev in events if not covers(ev)]
        params = self.params(model)
        item_row = model.item_row
        found = [item_row.get(ev.item_id) for ev in events]
        known = [j for j, r in enumerate(found) if r is not None]
        if not known:
            return {}
        rows = [r for r in found if r is not None]  # in the order of `known`
        n = len(known)
        types = np.array([events[j].event_type for j in known])
        values = np.fromiter((events[j].value for j in known), np.float64, n)
        ts = np.fromiter((events[j].ts_s for j in known), np.float64, n)
        scores = params.scores(types, values, ts, np.full(n, ts.max()))
        out: dict[int, float] = {}
        for r, sc in zip(rows, scores.tolist(), strict=True):
            if sc > 0:
                out[r] = out.get(r, 0.0) + sc
        return out

    def _derive(self, st: UserState, user_id: str, model: LoadedModel) -> Derived:
        # One copy under the user's lock: `apply` may change the events meanwhile, and the
        # version read with them says which state the copy is.
        with self._stripe(user_id):
            version = st.version
            events = list(st.events)
            seen = frozenset(st.seen)
        return Derived(model.generation, version, self._aggregate(events, model), seen)

    def profile(
        self,
        model: LoadedModel,
        user_id: str,
        context_rows: Mapping[int, float] | None = None,
    ) -> UserProfile:
        """The user's vector and interactions on `model` (context folded in, not stored)."""
        st = self._users.get(user_id)
        b_rows, b_vals = model.user_history(user_id)
        if st is None and not context_rows:
            return UserProfile(model.batch_user_vector(user_id), b_rows, b_vals, frozenset(),
                               b_rows)
        derived = None
        if st is not None:
            derived = st.derived
            if (derived is None or derived.generation != model.generation
                    or derived.version != st.version):
                derived = self._derive(st, user_id, model)
            elif not context_rows and derived.profile is not None:
                vec, rows, vals = derived.profile
                return UserProfile(vec, rows, vals, derived.seen, b_rows)
        recent = dict(derived.recent) if derived is not None else {}
        if context_rows:
            for r, w in context_rows.items():
                recent[r] = recent.get(r, 0.0) + w
        rows, vals = self._merge(b_rows, b_vals, recent, model)
        if not recent:
            vec = model.batch_user_vector(user_id)
            if vec is None and rows.size:
                vec = fold_in(model.item_factors, model.bundle.item_gram, rows, vals, model.foldin)
        elif rows.size:
            vec = fold_in(model.item_factors, model.bundle.item_gram, rows, vals, model.foldin)
        else:
            vec = None
        if st is not None and derived is not None:
            if not context_rows:
                derived.profile = (vec, rows, vals)
            with self._stripe(user_id):
                if st.version == derived.version:
                    st.derived = derived
        seen = derived.seen if derived is not None else frozenset()
        return UserProfile(vec, rows, vals, seen, b_rows)

    def _merge(self, b_rows: np.ndarray, b_vals: np.ndarray, recent: Mapping[int, float],
               model: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        if not recent:
            return b_rows, b_vals
        cap = self.params(model).max_confidence
        merged = dict(zip(b_rows.tolist(), b_vals.tolist(), strict=True))
        for r, w in recent.items():
            merged[r] = min(cap, merged.get(r, 0.0) + w)
        rows = np.fromiter(merged.keys(), dtype=np.int64, count=len(merged))
        vals = np.fromiter(merged.values(), dtype=np.float64, count=len(merged))
        return rows, vals

    # -- new items ---------------------------------------------------------------------
    def _drop_least_followed_pending(self) -> None:
        """Forget the tenth of unknown items with the fewest users (junk ids touched once)
        so a flood of made-up ids cannot grow memory without bound. Caller holds the lock."""
        keep = max(1, self.max_pending_items - self.max_pending_items // 10)
        ranked = sorted(self._pending.items(), key=lambda kv: len(kv[1]), reverse=True)
        self._pending = dict(ranked[:keep])

    def pending_items(self) -> int:
        return len(self._pending)

    def fold_new_items(self, model: LoadedModel, item_ids: list[str]) -> list[str]:
        """Give unknown items with enough interactions a vector and add them to the index."""
        ready_ids: list[str] = []
        ready_vecs: list[np.ndarray] = []
        for item_id in item_ids:
            if item_id in model.item_row:
                continue
            with self._pending_lock:
                users = dict(self._pending.get(item_id, {}))
            if len(users) < self.new_item_min:
                continue
            vecs, strengths = [], []
            for uid, w in users.items():
                v = self.profile(model, uid).vector
                if v is not None and np.any(v):
                    vecs.append(v)
                    strengths.append(w)
            if len(vecs) < self.new_item_min:
                continue
            u = np.vstack(vecs).astype(np.float32)
            cap = self.params(model).max_confidence
            vec = fold_in(u, model.bundle.user_gram, np.arange(len(vecs)),
                          np.minimum(np.asarray(strengths), cap), model.foldin)
            if np.all(np.isfinite(vec)) and np.any(vec):
                ready_ids.append(item_id)
                ready_vecs.append(vec)
        if not ready_ids:
            return []
        model.add_items(ready_ids, np.vstack(ready_vecs))
        # Users who touched the new items now get them in their fold-in.
        for item_id in ready_ids:
            with self._pending_lock:
                fans = list(self._pending.get(item_id, {}))
            for uid in fans:
                st = self._users.get(uid)
                if st is not None:
                    with self._stripe(uid):
                        st.version += 1
        return ready_ids

    # -- model swap --------------------------------------------------------------------
    def refold(self, model: LoadedModel) -> int:
        """Prepare `model` before it is swapped in: fold new items it lacks and fold every
        online user onto its factors. Changes no shared state: the model being served
        keeps every event until the swap has happened (`trim`)."""
        users = self.users()
        with self._pending_lock:
            pending = [i for i in self._pending if i not in model.item_row]
        for uid in users:
            self.profile(model, uid)
        self.fold_new_items(model, pending)
        for uid in users:  # users whose new items just got vectors
            self.profile(model, uid)
        return len(users)

    def trim(self, model: LoadedModel) -> int:
        """After `model` went live: forget the events and pending items it learned from
        (they are in its batch history now); returns the events dropped."""
        cut = model.cut
        dropped = 0
        if cut is not None:
            covers = _trained_on(cut)
            for uid in self.users():
                with self._users_lock:  # the count behind the events cap changes too
                    st = self._users.get(uid)
                    if st is None:
                        continue
                    with self._stripe(uid):
                        kept = [ev for ev in st.events if not covers(ev)]
                        if len(kept) != len(st.events):
                            gone = len(st.events) - len(kept)
                            dropped += gone
                            self._events_held -= gone
                            st.events = kept
                            st.version += 1
        with self._pending_lock:
            for item_id in [i for i in self._pending if i in model.item_row]:
                del self._pending[item_id]
        return dropped
