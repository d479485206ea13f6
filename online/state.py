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
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lake.config import Settings
from lake.foldin import fold_in
from lake.strength import StrengthParams
from online.model import LoadedModel

MAX_ONLINE_USERS = 1_000_000
"""Least-recently-active users beyond this are dropped from memory (their events are safe
in the WAL / lake and reach them again through the next batch model)."""
_STRIPES = 64


@dataclass(slots=True)
class RecentEvent:
    item_id: str
    event_type: str
    ts: datetime
    value: float
    """The event's value (rating, count, quantity); NaN when it had none."""
    received_at: datetime | None
    """When the lake got it (decides whether a model's training saw it)."""


@dataclass
class Derived:
    """What a user's real-time events give on one model at one state version (events
    decay from the user's latest one, so nothing else changes it)."""

    generation: int
    version: int
    recent: dict[int, float]
    """`OnlineState._aggregate`: what a request with a basket context adds its items to."""
    profile: tuple[np.ndarray | None, np.ndarray, np.ndarray] | None = None
    """(vector, rows, values) without a context, once a request has folded them in."""


@dataclass
class UserState:
    events: deque[RecentEvent]
    version: int = 0
    derived: Derived | None = None
    """What the events gave on the last model and state version a request saw."""
    seen: dict[str, None] = field(default_factory=dict)
    """Real-time seen item ids, oldest first (a dict keeps insertion order), at most
    `server.seen_items_per_user`: a user streaming distinct items cannot grow it forever."""


@dataclass
class UserProfile:
    """What a request needs about a user, resolved against one model."""

    vector: np.ndarray | None
    rows: np.ndarray
    """Item rows of the user's interactions (batch and real time), for seen/explanations."""
    values: np.ndarray
    seen_ids: set[str]
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
            self._version += 1

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
        # The configured strength; a model trained with a recipe brings its own (manifest).
        self.strength = StrengthParams.from_settings(settings.interactions)
        self.recent_cap = srv.recent_events_per_user
        self.seen_types = set(srv.seen_event_types)
        self.seen_cap = srv.seen_items_per_user
        self.new_item_min = srv.new_item_min_interactions
        self.popularity = Popularity(srv.popularity_half_life_days,
                                     max_items=srv.popularity_max_items)
        self.max_pending_items = srv.max_pending_items
        self._users: OrderedDict[str, UserState] = OrderedDict()
        self._users_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # Items unknown to the serving model: item -> {user -> summed weight}.
        self._pending: dict[str, dict[str, float]] = {}
        self._pending_lock = threading.Lock()

    # -- bookkeeping -------------------------------------------------------------------
    def _stripe(self, user_id: str) -> threading.Lock:
        return self._stripes[hash(user_id) % _STRIPES]

    def __len__(self) -> int:
        return len(self._users)

    def params(self, model: LoadedModel) -> StrengthParams:
        """The strength settings `model` was trained with (the configured ones for a bundle
        that does not record them)."""
        return model.strength or self.strength

    def users(self) -> list[str]:
        with self._users_lock:
            return list(self._users)

    def get(self, user_id: str) -> UserState | None:
        return self._users.get(user_id)

    def _get_or_create(self, user_id: str) -> UserState:
        with self._users_lock:
            st = self._users.get(user_id)
            if st is None:
                st = UserState(events=deque(maxlen=self.recent_cap))
                self._users[user_id] = st
                while len(self._users) > MAX_ONLINE_USERS:
                    self._users.popitem(last=False)
            else:
                self._users.move_to_end(user_id)
            return st

    def forget(self, user_id: str) -> bool:
        with self._users_lock:
            existed = self._users.pop(user_id, None) is not None
        with self._pending_lock:
            for users in self._pending.values():
                users.pop(user_id, None)
        return existed

    # -- events ------------------------------------------------------------------------
    def apply(
        self, model: LoadedModel | None, events: Iterable[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Fold accepted (normalised) events into user state; returns what changed.

        Returns {"users": [...touched], "new_items": [...added to the index], "lags": [...]}.
        """
        touched: dict[str, None] = {}
        unknown_items: dict[str, None] = {}
        lags: list[float] = []
        now = datetime.now(UTC)
        events = list(events)
        values = [float("nan") if e.get("value") is None else float(e["value"]) for e in events]
        # one vectorised call for the batch, not one per event (this is the ingest path)
        weights = self.strength.base(np.array([e["event_type"] for e in events]),
                                     np.array(values, dtype=np.float64)).tolist()
        for e, value, w in zip(events, values, weights, strict=True):
            user_id, item_id, etype = e["user_id"], e["item_id"], e["event_type"]
            ts: datetime = e["ts"]
            lags.append(max(0.0, (now - ts).total_seconds()))
            st = self._get_or_create(user_id)
            with self._stripe(user_id):
                st.events.append(RecentEvent(item_id, etype, ts, value, e.get("received_at")))
                if etype in self.seen_types:
                    seen = st.seen
                    seen.pop(item_id, None)  # seen again: now the newest
                    seen[item_id] = None
                    if len(seen) > self.seen_cap:
                        del seen[next(iter(seen))]
                st.version += 1
            touched[user_id] = None
            if w > 0:
                self.popularity.add(item_id, w, ts)
                if model is None or item_id not in model.item_row:
                    with self._pending_lock:
                        users = self._pending.setdefault(item_id, {})
                        users[user_id] = users.get(user_id, 0.0) + w
                        if len(self._pending) > self.max_pending_items:
                            self._drop_least_followed_pending()
                    unknown_items[item_id] = None
        new_items: list[str] = []
        if model is not None:  # touched users fold in lazily, at their next request
            new_items = self.fold_new_items(model, list(unknown_items))
        return {"users": list(touched), "new_items": new_items, "lags": lags}

    def _aggregate(self, st: UserState, model: LoadedModel) -> dict[int, float]:
        """Recent events as {item row: summed strength} for items the model knows.

        The strength is `lake.strength` with the model's own settings, decayed from the
        user's latest real-time event (the batch decayed from the latest event it saw), so
        a user whose history arrives only online gets what the trainer would have given
        them for the same events.
        """
        cut = model.cut
        events = [ev for ev in st.events  # what the batch history already holds counts once
                  if cut is None or not cut.covers(ev.ts, ev.received_at)]
        params = self.params(model)
        found = [model.item_row.get(ev.item_id) for ev in events]
        known = [j for j, r in enumerate(found) if r is not None]
        if not known:
            return {}
        rows = [r for r in found if r is not None]  # in the order of `known`
        types = np.array([events[j].event_type for j in known])
        values = np.array([events[j].value for j in known], dtype=np.float64)
        ts = np.array([events[j].ts.timestamp() for j in known], dtype=np.float64)
        scores = params.scores(types, values, ts, np.full(ts.shape, ts.max()))
        out: dict[int, float] = {}
        for r, sc in zip(rows, scores.tolist(), strict=True):
            if sc > 0:
                out[r] = out.get(r, 0.0) + sc
        return out

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
            return UserProfile(model.batch_user_vector(user_id), b_rows, b_vals, set(), b_rows)
        derived = None
        if st is not None:
            derived = st.derived
            if (derived is None or derived.generation != model.generation
                    or derived.version != st.version):
                # the version is read before the events: a later event recomputes
                derived = Derived(model.generation, st.version, self._aggregate(st, model))
            elif not context_rows and derived.profile is not None:
                vec, rows, vals = derived.profile
                return UserProfile(vec, rows, vals, set(st.seen), b_rows)
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
        return UserProfile(vec, rows, vals, set(st.seen) if st is not None else set(), b_rows)

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
            for uid in self.users():
                st = self._users.get(uid)
                if st is None:
                    continue
                with self._stripe(uid):
                    kept = [ev for ev in st.events if not cut.covers(ev.ts, ev.received_at)]
                    if len(kept) != len(st.events):
                        dropped += len(st.events) - len(kept)
                        st.events = deque(kept, maxlen=self.recent_cap)
                        st.version += 1
        with self._pending_lock:
            for item_id in [i for i in self._pending if i in model.item_row]:
                del self._pending[item_id]
        return dropped
