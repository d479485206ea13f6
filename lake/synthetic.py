"""Deterministic synthetic e-commerce events for scale tests and the embedded default setup.

The generator simulates shoppers browsing a catalogue in sessions:

* **Catalogue.** `n_items` items in 20-50 categories (fewer only when there are fewer items).
  Category sizes are skewed; prices are log-normal with a per-category median; about 95% of
  items are available. Item popularity follows a Zipf law (weight ``1 / rank``) over a random
  ranking, so a small head of items gets most of the traffic.
* **Users.** Activity is log-normal (some heavy shoppers, many light ones). Each user's taste
  is a mixture over three distinct categories with weights sorted descending (slot 0 is the
  favourite). A share of users (`drift_share`, default 30%) *drifts*: at the midpoint of the
  time window their favourite category is replaced by another category they never liked before
  (`World.users.drift_to`).
* **Sessions.** A session belongs to one user, starts at a time drawn over the window (with a
  daily rhythm that peaks in the evening), browses one category of the user's taste at that
  time, and views 1 + Geometric items: 85% from that category, 15% from the whole catalogue,
  both drawn by popularity. Each view may continue down the funnel
  ``view -> click -> add_to_cart -> purchase`` (click 35%, cart 30% of clicks, purchase 45% of
  carts), so every purchase is preceded in its session by a view, a click and a cart of the
  same item, and views outnumber clicks, carts and purchases in that order. Events of a
  session are seconds apart (exponential gaps, mean 25 s).
* **Columns.** Bronze schema (`lake.schemas.BRONZE_EVENTS`). Users are ``u<k>`` for
  ``k in [0, n_users)``, items ``i<k>`` for ``k in [0, n_items)``; event ids are
  ``syn<seed>-e<n>`` and session ids ``syn<seed>-s<n>`` (globally numbered, hence unique
  and deterministic). ``value`` is the item's price for ``add_to_cart`` and ``purchase``,
  null for ``view`` and ``click``. ``received_at`` is ``ts`` plus a sub-second lag.
  ``properties`` is ``{"channel": ..., "device": ...}`` per session.

Determinism: the same arguments give byte-identical tables. Every random stream is derived
from ``(seed, purpose[, block])`` with NumPy's `SeedSequence`, so the catalogue depends only
on ``(n_items, seed)`` and is the same one `generate` draws items from. The defaults for `end`
and `updated_at` follow today's date: pass them explicitly to reproduce data on another day.

Memory is bounded: sessions are simulated in blocks of at most 100,000 sessions (about half a
million events) with vectorised NumPy and turned into Arrow tables without Python objects per
row, so 10M events stream through in constant memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake.schemas import BRONZE_EVENTS, ITEMS

EVENT_ID_PREFIX = "syn"
"""Every synthetic event id starts with ``syn<seed>-``; `lake.load` uses it to replace them."""

CATEGORY_NAMES: tuple[str, ...] = (
    "electronics", "books", "clothing", "shoes", "home", "kitchen", "garden", "toys",
    "sports", "beauty", "health", "grocery", "pets", "automotive", "tools", "music",
    "movies", "games", "office", "baby", "jewelry", "watches", "bags", "outdoor",
    "furniture", "lighting", "bedding", "bath", "crafts", "stationery", "cameras", "audio",
    "computers", "phones", "tablets", "software", "camping", "cycling", "fitness", "fishing",
    "party", "travel", "wine", "coffee", "tea", "snacks", "cleaning", "storage", "art", "hobby",
)
ADJECTIVES: tuple[str, ...] = (
    "Classic", "Deluxe", "Compact", "Eco", "Premium", "Smart", "Vintage", "Ultra", "Basic",
    "Pro", "Mini", "Urban", "Handmade", "Essential", "Bold", "Light",
)
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
DEVICE_P = (0.6, 0.3, 0.1)
CHANNELS: tuple[str, ...] = ("organic", "search", "email", "ads")
CHANNEL_P = (0.4, 0.35, 0.1, 0.15)
FUNNEL: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")

MIN_CATEGORIES = 20
MAX_CATEGORIES = 50
TASTE_SLOTS = 3
CLICK_P = 0.35
CART_P = 0.30
PURCHASE_P = 0.45
EXPLORE_P = 0.15
VIEWS_GEOMETRIC_P = 0.3  # views per session = Geometric(p) >= 1, mean 1/p
MEAN_GAP_S = 25.0
MEAN_LAG_S = 0.5
# Share of sessions starting in each UTC hour (quiet nights, evening peak).
HOUR_WEIGHTS = np.array(
    [2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 6, 6, 7, 6, 6, 6, 7, 8, 9, 10, 10, 9, 6, 4], dtype=np.float64
)
FIRST_BLOCK_SESSIONS = 2_000
MAX_BLOCK_SESSIONS = 100_000

_US = 1_000_000
_DAY_US = 86_400 * _US

# Stream tags for SeedSequence: each purpose gets an independent, reproducible stream.
_ITEMS, _USERS, _BLOCK = 1, 2, 3


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *tags])))


def _check_sizes(**sizes: int) -> None:
    """Counts must be integers; `n_events` and `seed` may be 0, the others must be >= 1."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {type(v).__name__}")
        low = 0 if name in ("n_events", "seed") else 1
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")


def n_categories_for(n_items: int) -> int:
    """Number of categories for a catalogue of `n_items`: sqrt(n_items) within [20, 50]."""
    return int(min(n_items, max(MIN_CATEGORIES, min(MAX_CATEGORIES, round(n_items**0.5)))))


def default_end() -> date:
    """Yesterday (UTC): the last day with events by default, so a nightly run finds data."""
    return datetime.now(UTC).date() - timedelta(days=1)


@dataclass(frozen=True, eq=False)
class ItemWorld:
    """The known structure of the catalogue (index k is item ``i<k>``)."""

    categories: tuple[str, ...]
    """Category names; `item_category` indexes into it."""
    item_category: np.ndarray
    """int32 [n_items]: category index of each item."""
    popularity: np.ndarray
    """float64 [n_items]: Zipf weight of each item (sums to 1)."""
    price: np.ndarray
    """float64 [n_items]: price, rounded to cents."""
    available: np.ndarray
    """bool [n_items]."""
    _order: np.ndarray  # item indices sorted by category
    _cum: np.ndarray  # cumulative popularity along _order
    _cat_lo: np.ndarray  # per category: cumulative popularity before its first item
    _cat_hi: np.ndarray  # ... and after its last item

    @property
    def n_items(self) -> int:
        return int(self.item_category.size)

    def category_of(self, item_id: str) -> str:
        """Category name of an item id such as ``"i42"``."""
        return self.categories[int(self.item_category[int(item_id.removeprefix("i"))])]

    def sample(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """Draw one item per entry by popularity, within the category given (-1: any)."""
        u = rng.random(categories.size)
        any_cat = categories < 0
        c = np.where(any_cat, 0, categories)
        lo = np.where(any_cat, 0.0, self._cat_lo[c])
        hi = np.where(any_cat, self._cum[-1], self._cat_hi[c])
        pos = np.searchsorted(self._cum, lo + u * (hi - lo), side="right")
        return self._order[np.minimum(pos, self._order.size - 1)]


@dataclass(frozen=True, eq=False)
class UserWorld:
    """The known structure of the users (index k is user ``u<k>``)."""

    activity: np.ndarray
    """float64 [n_users]: probability that a session belongs to the user."""
    taste: np.ndarray
    """int32 [n_users, 3]: the user's categories; column 0 is the favourite."""
    taste_weights: np.ndarray
    """float64 [n_users, 3]: mixture weights, sorted descending, rows sum to 1."""
    drifting: np.ndarray
    """bool [n_users]: whether the user's favourite changes at the window's midpoint."""
    drift_to: np.ndarray
    """int32 [n_users]: the new favourite category of a drifting user (not in `taste`), else -1."""

    @property
    def n_users(self) -> int:
        return int(self.activity.size)


@dataclass(frozen=True, eq=False)
class World:
    items: ItemWorld
    users: UserWorld


def item_world(n_items: int, seed: int) -> ItemWorld:
    """The catalogue structure for `(n_items, seed)`; `catalogue` and `generate` use this."""
    _check_sizes(n_items=n_items, seed=seed)
    rng = _rng(seed, _ITEMS)
    n_cat = n_categories_for(n_items)
    names = tuple(CATEGORY_NAMES[i] for i in rng.permutation(len(CATEGORY_NAMES))[:n_cat])
    # Skewed category sizes; every category gets at least one item.
    cat_w = rng.dirichlet(np.full(n_cat, 2.0))
    item_category = np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, size=n_items - n_cat, p=cat_w)]
    ).astype(np.int32)
    item_category = item_category[rng.permutation(n_items)]
    rank = rng.permutation(n_items)
    popularity = 1.0 / (rank + 1.0)
    popularity /= popularity.sum()
    median_price = np.exp(rng.uniform(np.log(5.0), np.log(500.0), size=n_cat))
    price = np.round(median_price[item_category] * rng.lognormal(0.0, 0.5, size=n_items), 2)
    price = np.maximum(price, 0.5)
    available = rng.random(n_items) >= 0.05
    order = np.argsort(item_category, kind="stable")
    cum = np.cumsum(popularity[order])
    counts = np.bincount(item_category, minlength=n_cat)
    ends = np.cumsum(counts)
    cat_hi = cum[ends - 1]
    cat_lo = np.concatenate([[0.0], cat_hi[:-1]])
    return ItemWorld(names, item_category, popularity, price, available, order, cum, cat_lo,
                     cat_hi)


def _user_world(n_users: int, items: ItemWorld, seed: int, drift_share: float) -> UserWorld:
    _check_sizes(n_users=n_users, seed=seed)
    if not 0.0 <= drift_share <= 1.0:
        raise ValueError(f"drift_share must be within [0, 1], got {drift_share}")
    n_cat = len(items.categories)
    rng = _rng(seed, _USERS)
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    activity /= activity.sum()
    # Category appeal = its share of item popularity; distinct picks via Gumbel top-k.
    cat_pop = np.bincount(items.item_category, weights=items.popularity, minlength=n_cat)
    log_w = np.log(np.maximum(cat_pop, 1e-12))
    k = min(TASTE_SLOTS + 1, n_cat)
    picks = np.empty((n_users, k), dtype=np.int32)
    for lo in range(0, n_users, 50_000):  # bounded memory for many users
        hi = min(lo + 50_000, n_users)
        keys = log_w + rng.gumbel(size=(hi - lo, n_cat))
        picks[lo:hi] = np.argsort(-keys, axis=1)[:, :k]
    taste = picks[:, :TASTE_SLOTS] if k > TASTE_SLOTS else np.pad(
        picks, ((0, 0), (0, TASTE_SLOTS - k)), mode="edge")
    weights = -np.sort(-rng.dirichlet(np.ones(TASTE_SLOTS), size=n_users), axis=1)
    drifting = rng.random(n_users) < drift_share
    if n_cat <= TASTE_SLOTS:  # no category left to drift to
        drifting[:] = False
    drift_to = np.where(drifting, picks[:, -1], -1).astype(np.int32)
    return UserWorld(activity, taste.astype(np.int32), weights, drifting, drift_to)


def world(n_users: int, n_items: int, seed: int, *, drift_share: float = 0.3) -> World:
    """Everything known about the synthetic shop for these arguments (for tests and docs)."""
    items = item_world(n_items, seed)
    return World(items, _user_world(n_users, items, seed, drift_share))


def window(days: int, end: date | datetime | None = None) -> tuple[datetime, datetime]:
    """The half-open time window ``[start, stop)`` covering `days` whole UTC days up to `end`.

    `end` is the last day with events (inclusive); a datetime is truncated to its UTC date.
    The default is yesterday, UTC.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be an integer >= 1, got {days!r}")
    if end is None:
        end = default_end()
    elif isinstance(end, datetime):
        end = (end if end.tzinfo else end.replace(tzinfo=UTC)).astimezone(UTC).date()
    stop = datetime.combine(end + timedelta(days=1), time(0), tzinfo=UTC)
    return stop - timedelta(days=days), stop


def switch_time(days: int, end: date | datetime | None = None) -> datetime:
    """When drifting users switch favourites: the midpoint of the window."""
    start, stop = window(days, end)
    return start + (stop - start) / 2


def catalogue(n_items: int, seed: int, *, updated_at: datetime | None = None) -> pa.Table:
    """The item catalogue (`lake.schemas.ITEMS` schema) that `generate` draws items from.

    `updated_at` defaults to the start of today (UTC); pass it for reproducible bytes.
    """
    w = item_world(n_items, seed)
    if updated_at is None:
        updated_at = datetime.combine(datetime.now(UTC).date(), time(0), tzinfo=UTC)
    idx = np.arange(n_items)
    ids = _prefixed("i", idx)
    cats = pa.array(w.categories, pa.string()).take(pa.array(w.item_category))
    adj = pa.array(ADJECTIVES, pa.string()).take(pa.array(idx % len(ADJECTIVES)))
    cat_title = pc.utf8_capitalize(cats)
    titles = pc.binary_join_element_wise(adj, cat_title, pc.binary_join_element_wise(
        "#", pc.cast(pa.array(idx), pa.string()), ""), " ")
    return pa.table(
        {
            "item_id": ids,
            "category": cats,
            "price": pa.array(w.price, pa.float64()),
            "available": pa.array(w.available, pa.bool_()),
            "title": titles,
            "updated_at": pa.array(np.full(n_items, _to_us(updated_at), dtype=np.int64),
                                   pa.int64()).cast(ITEMS.schema.field("updated_at").type),
        },
        schema=ITEMS.schema,
    )


def generate(
    n_events: int,
    n_users: int,
    n_items: int,
    seed: int,
    days: int = 30,
    end: date | datetime | None = None,
    *,
    drift_share: float = 0.3,
) -> Iterator[pa.Table]:
    """Yield bronze-schema tables holding exactly `n_events` events in total.

    Args:
        n_events: total number of events (rows) over all yielded tables.
        n_users: users are ``u0 .. u<n_users-1>`` (a small `n_events` touches only some).
        n_items: items are ``i0 .. i<n_items-1>``, as in `catalogue(n_items, seed)`.
        seed: non-negative seed; the same arguments give byte-identical tables.
        days: number of whole UTC days covered.
        end: last day with events (inclusive); default yesterday (UTC).
        drift_share: share of users whose favourite category changes at mid-window.

    Yields:
        Tables of at most about 500k rows each (one per simulated block of sessions).
    """
    _check_sizes(n_events=n_events, n_users=n_users, n_items=n_items, seed=seed)
    start, stop = window(days, end)
    w = world(n_users, n_items, seed, drift_share=drift_share)
    start_us, stop_us = _to_us(start), _to_us(stop)
    switch_us = start_us + (stop_us - start_us) // 2
    user_ids = _prefixed("u", np.arange(n_users))
    item_ids = _prefixed("i", np.arange(n_items))
    props = pa.array(
        [json.dumps({"channel": c, "device": d}, sort_keys=True, separators=(",", ":"))
         for d in DEVICES for c in CHANNELS], pa.string())
    etypes = pa.array(FUNNEL, pa.string())
    user_cum = np.cumsum(w.users.activity)
    taste_cum = np.cumsum(w.users.taste_weights, axis=1)
    hour_p = HOUR_WEIGHTS / HOUR_WEIGHTS.sum()

    emitted = 0
    next_session = 0
    block = 0
    while emitted < n_events:
        n_sessions = min(FIRST_BLOCK_SESSIONS << min(block, 20), MAX_BLOCK_SESSIONS)
        rng = _rng(seed, _BLOCK, block)
        # --- sessions ---------------------------------------------------------------
        users = np.minimum(np.searchsorted(user_cum, rng.random(n_sessions) * user_cum[-1],
                                           side="right"), n_users - 1)
        day = rng.integers(0, days, size=n_sessions)
        hour = rng.choice(24, size=n_sessions, p=hour_p)
        sec_us = rng.integers(0, 3600 * _US, size=n_sessions)
        s_start = start_us + day * _DAY_US + hour * (3600 * _US) + sec_us
        slot = (rng.random(n_sessions)[:, None] >= taste_cum[users]).sum(axis=1)
        slot = np.minimum(slot, TASTE_SLOTS - 1)
        s_cat = w.users.taste[users, slot]
        drifted = (slot == 0) & w.users.drifting[users] & (s_start >= switch_us)
        s_cat = np.where(drifted, w.users.drift_to[users], s_cat)
        s_props = rng.choice(len(DEVICES), size=n_sessions, p=DEVICE_P) * len(CHANNELS) + \
            rng.choice(len(CHANNELS), size=n_sessions, p=CHANNEL_P)
        n_views = rng.geometric(VIEWS_GEOMETRIC_P, size=n_sessions)
        # --- views --------------------------------------------------------------------
        v_session = np.repeat(np.arange(n_sessions), n_views)
        explore = rng.random(v_session.size) < EXPLORE_P
        v_item = w.items.sample(rng, np.where(explore, -1, s_cat[v_session]))
        r = rng.random((v_session.size, 3))
        depth = 1 + (r[:, 0] < CLICK_P)
        depth += (depth == 2) & (r[:, 1] < CART_P)
        depth += (depth == 3) & (r[:, 2] < PURCHASE_P)
        # --- events -------------------------------------------------------------------
        e_view = np.repeat(np.arange(v_session.size), depth)
        n_ev = e_view.size
        view_first = np.cumsum(depth) - depth
        step = np.arange(n_ev) - np.repeat(view_first, depth)
        e_session = v_session[e_view]
        e_item = v_item[e_view]
        gaps = np.round(rng.exponential(MEAN_GAP_S * _US, size=n_ev)).astype(np.int64)
        ev_per_session = np.bincount(e_session, minlength=n_sessions)
        session_first = np.cumsum(ev_per_session) - ev_per_session
        gaps[session_first[ev_per_session > 0]] = 0  # first event at the session start
        cum = np.cumsum(gaps)
        offset = cum - np.repeat(cum[session_first], ev_per_session)
        ts = np.minimum(s_start[e_session] + offset, stop_us - 1)
        lag = np.round(rng.exponential(MEAN_LAG_S * _US, size=n_ev)).astype(np.int64)

        take = min(n_ev, n_events - emitted)
        sl = slice(0, take)
        e_user = users[e_session[sl]]
        value = w.items.price[e_item[sl]]
        is_money = step[sl] >= 2
        ts_type = BRONZE_EVENTS.schema.field("ts").type
        ts_arr = pa.array(ts[sl], pa.int64()).cast(ts_type)
        table = pa.table(
            {
                "event_id": _prefixed(f"{EVENT_ID_PREFIX}{seed}-e", emitted + np.arange(take)),
                "user_id": user_ids.take(pa.array(e_user)),
                "item_id": item_ids.take(pa.array(e_item[sl])),
                "event_type": etypes.take(pa.array(step[sl])),
                "value": pa.array(value, pa.float64(), mask=~is_money),
                "ts": ts_arr,
                "received_at": pa.array(ts[sl] + lag[sl], pa.int64()).cast(ts_type),
                "session_id": _prefixed(f"{EVENT_ID_PREFIX}{seed}-s",
                                        next_session + e_session[sl]),
                "properties": props.take(pa.array(s_props[e_session[sl]])),
                "event_date": pc.cast(ts_arr, pa.date32()),
                "tenant": pa.repeat(pa.scalar("", pa.string()), take),  # no access key
                "recommendation_id": pa.repeat(pa.scalar("", pa.string()), take),
            },
            schema=BRONZE_EVENTS.schema,
        )
        emitted += take
        next_session += n_sessions
        block += 1
        if take:
            yield table


def generate_table(
    n_events: int,
    n_users: int,
    n_items: int,
    seed: int,
    days: int = 30,
    end: date | datetime | None = None,
    *,
    drift_share: float = 0.3,
) -> pa.Table:
    """All of `generate(...)` as one table (for small sizes: it is held in memory)."""
    parts = list(generate(n_events, n_users, n_items, seed, days, end, drift_share=drift_share))
    if not parts:
        return BRONZE_EVENTS.schema.empty_table()
    return pa.concat_tables(parts).combine_chunks()


def _prefixed(prefix: str, idx: np.ndarray) -> pa.Array:
    """``prefix + str(i)`` for every i, built in Arrow (no Python object per row)."""
    digits = pc.cast(pa.array(np.asarray(idx, dtype=np.int64)), pa.string())
    out = pc.binary_join_element_wise(prefix, digits, "")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def _to_us(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise ValueError(f"timestamp must be timezone-aware (UTC): {ts!r}")
    delta = ts.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds
