"""The synthetic generator: determinism, exact sizes, schema, funnel, skew and drift."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lake import synthetic
from lake.schemas import BRONZE_EVENTS, ITEMS
from lake.validation import validate_events_table

END = date(2026, 11, 21)
DAYS = 14
N_EVENTS, N_USERS, N_ITEMS, SEED = 20_000, 500, 300, 11


@pytest.fixture(scope="module")
def events() -> pa.Table:
    return synthetic.generate_table(N_EVENTS, N_USERS, N_ITEMS, SEED, DAYS, END)


@pytest.fixture(scope="module")
def world() -> synthetic.World:
    return synthetic.world(N_USERS, N_ITEMS, SEED)


def _ipc_bytes(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def _idx(col: pa.ChunkedArray, prefix: str) -> np.ndarray:
    return np.asarray(pc.cast(pc.utf8_slice_codeunits(col, len(prefix)), pa.int64()))


# -- determinism -------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_output(events: pa.Table) -> None:
    again = synthetic.generate_table(N_EVENTS, N_USERS, N_ITEMS, SEED, DAYS, END)
    assert _ipc_bytes(again) == _ipc_bytes(events)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert _ipc_bytes(synthetic.catalogue(N_ITEMS, SEED, updated_at=at)) == _ipc_bytes(
        synthetic.catalogue(N_ITEMS, SEED, updated_at=at))


def test_different_seed_gives_different_output(events: pa.Table) -> None:
    other = synthetic.generate_table(N_EVENTS, N_USERS, N_ITEMS, SEED + 1, DAYS, END)
    assert other.num_rows == events.num_rows
    assert not other.equals(events)
    assert other.column("item_id").to_pylist() != events.column("item_id").to_pylist()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert not synthetic.catalogue(N_ITEMS, SEED + 1, updated_at=at).equals(
        synthetic.catalogue(N_ITEMS, SEED, updated_at=at))


# -- sizes, ids, schema ------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 999, 2_000, 12_345])
def test_event_count_is_exact(n: int) -> None:
    t = synthetic.generate_table(n, 50, 40, 3, 7, END)
    assert t.num_rows == n
    assert t.schema == BRONZE_EVENTS.schema


def test_streams_in_several_tables_with_globally_unique_ids() -> None:
    parts = list(synthetic.generate(60_000, 200, 100, 5, 7, END))
    assert len(parts) > 1
    assert sum(p.num_rows for p in parts) == 60_000
    ids = pa.concat_tables(parts).column("event_id")
    assert pc.count_distinct(ids).as_py() == 60_000
    assert ids[0].as_py() == "syn5-e0" and ids[-1].as_py() == "syn5-e59999"


def test_ids_stay_within_the_size_flags(events: pa.Table) -> None:
    users = _idx(events.column("user_id"), "u")
    items = _idx(events.column("item_id"), "i")
    assert users.min() >= 0 and users.max() < N_USERS
    assert items.min() >= 0 and items.max() < N_ITEMS
    assert len(np.unique(users)) > N_USERS * 0.8  # 20k events reach most of 500 users
    cat = synthetic.catalogue(N_ITEMS, SEED)
    assert cat.num_rows == N_ITEMS
    assert pc.count_distinct(cat.column("item_id")).as_py() == N_ITEMS
    assert set(events.column("item_id").to_pylist()) <= set(cat.column("item_id").to_pylist())
    assert pc.count_distinct(events.column("event_id")).as_py() == N_EVENTS


def test_events_pass_bronze_validation(events: pa.Table) -> None:
    validated = validate_events_table(events)
    assert validated.equals(events)


def test_timestamps_fill_the_window_up_to_end(events: pa.Table) -> None:
    start = datetime(2026, 11, 8, tzinfo=UTC)  # 14 days ending 2026-11-21 inclusive
    stop = datetime(2026, 11, 22, tzinfo=UTC)
    assert synthetic.window(DAYS, END) == (start, stop)
    lo, hi = pc.min_max(events.column("ts")).values()
    assert lo.as_py() >= start and hi.as_py() < stop
    dates = set(events.column("event_date").to_pylist())
    assert dates == {start.date() + timedelta(days=k) for k in range(DAYS)}
    assert pc.all(pc.greater_equal(events.column("received_at"), events.column("ts"))).as_py()
    assert events.column("event_date").equals(pc.cast(events.column("ts"), pa.date32()))


def test_default_end_is_yesterday_utc() -> None:
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    t = synthetic.generate_table(500, 20, 20, 1, days=1)
    assert set(t.column("event_date").to_pylist()) == {yesterday}


def test_values_and_properties() -> None:
    t = synthetic.generate_table(5_000, 50, 40, 2, 7, END)
    money = pc.is_in(t.column("event_type"), pa.array(["add_to_cart", "purchase"]))
    assert pc.all(pc.is_valid(t.filter(money).column("value"))).as_py()
    assert t.filter(pc.invert(money)).column("value").null_count == t.filter(
        pc.invert(money)).num_rows
    devices = {p.split('"device":"')[1].split('"')[0] for p in
               set(t.column("properties").to_pylist())}
    assert devices == {"mobile", "desktop", "tablet"}


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_users"):
        next(synthetic.generate(10, 0, 10, 1))
    with pytest.raises(ValueError, match="seed"):
        next(synthetic.generate(10, 10, 10, -1))
    with pytest.raises(ValueError, match="days"):
        next(synthetic.generate(10, 10, 10, 1, days=0))


# -- catalogue -----------------------------------------------------------------------------
def test_catalogue_categories_prices_availability(world: synthetic.World) -> None:
    cat = synthetic.catalogue(N_ITEMS, SEED)
    assert cat.schema == ITEMS.schema
    cats = cat.column("category").to_pylist()
    assert 20 <= len(set(cats)) <= 50
    big = synthetic.catalogue(10_000, SEED)
    assert len(set(big.column("category").to_pylist())) == 50
    assert [world.items.category_of(i) for i in cat.column("item_id").to_pylist()] == cats
    avail = np.asarray(cat.column("available"))
    assert 0.85 < avail.mean() < 1.0
    # Log-normal prices with a per-category median: medians differ by far more than noise.
    prices = np.asarray(big.column("price"))
    assert (prices > 0).all()
    codes = np.unique(big.column("category").to_pylist(), return_inverse=True)[1]
    medians = np.array([np.median(prices[codes == c]) for c in range(codes.max() + 1)])
    assert medians.max() / medians.min() > 10


def test_tiny_catalogue_has_one_category_per_item() -> None:
    cat = synthetic.catalogue(5, 1)
    assert cat.num_rows == 5 and len(set(cat.column("category").to_pylist())) == 5


# -- behaviour -------------------------------------------------------------------------
def test_funnel_shape(events: pa.Table) -> None:
    counts = dict(zip(*(c.to_pylist() for c in
                        pc.value_counts(events.column("event_type")).flatten()), strict=True))
    assert counts["view"] > counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert 0.30 < counts["click"] / counts["view"] < 0.40  # CLICK_P = 0.35
    assert 0.24 < counts["add_to_cart"] / counts["click"] < 0.36  # CART_P = 0.30
    assert 0.35 < counts["purchase"] / counts["add_to_cart"] < 0.55  # PURCHASE_P = 0.45
    assert counts["purchase"] / counts["view"] < 0.1


def test_every_purchase_follows_a_view_click_and_cart_in_its_session(events: pa.Table) -> None:
    rows = events.select(["session_id", "item_id", "event_type", "ts"]).to_pylist()
    first: dict[tuple[str, str, str], datetime] = {}
    for r in rows:
        key = (r["session_id"], r["item_id"], r["event_type"])
        first[key] = min(first.get(key, r["ts"]), r["ts"])
    purchases = [r for r in rows if r["event_type"] == "purchase"]
    assert purchases
    for p in purchases:
        for before in ("view", "click", "add_to_cart"):
            t = first.get((p["session_id"], p["item_id"], before))
            assert t is not None and t <= p["ts"], (p, before)


def test_sessions_belong_to_one_user(events: pa.Table) -> None:
    g = events.group_by("session_id").aggregate([("user_id", "count_distinct")])
    assert pc.max(g.column("user_id_count_distinct")).as_py() == 1
    assert g.num_rows < events.num_rows / 2  # several events per session


def test_popularity_is_skewed(events: pa.Table) -> None:
    views = events.filter(pc.equal(events.column("event_type"), "view"))
    counts = np.sort(np.bincount(_idx(views.column("item_id"), "i"), minlength=N_ITEMS))[::-1]
    top_share = counts[: N_ITEMS // 10].sum() / counts.sum()
    assert top_share > 0.4  # uniform popularity would give 0.10


def test_drifting_users_switch_favourite_at_mid_window(
    events: pa.Table, world: synthetic.World
) -> None:
    views = events.filter(pc.equal(events.column("event_type"), "view"))
    users = _idx(views.column("user_id"), "u")
    cats = world.items.item_category[_idx(views.column("item_id"), "i")]
    switch = synthetic.switch_time(DAYS, END)
    assert switch == datetime(2026, 11, 15, tzinfo=UTC)
    late = pc.greater_equal(views.column("ts"), pa.scalar(switch)).to_numpy(
        zero_copy_only=False)
    drifting = world.users.drifting[users]
    assert 0.2 < world.users.drifting.mean() < 0.4  # drift_share = 0.3
    new_fav = world.users.drift_to[users]
    old_fav = world.users.taste[users, 0]
    dr = world.users.drifting
    assert (world.users.drift_to[dr, None] != world.users.taste[dr]).all()  # a new category
    assert (world.users.drift_to[~dr] == -1).all()

    def share(mask: np.ndarray, fav: np.ndarray) -> float:
        return float(np.mean(cats[mask] == fav[mask]))

    before, after = drifting & ~late, drifting & late
    assert before.sum() > 500 and after.sum() > 500
    assert share(before, new_fav) < 0.05 < 0.3 < share(after, new_fav)
    assert share(after, old_fav) < 0.05 < 0.3 < share(before, old_fav)
    # Users who do not drift keep their favourite.
    stable = ~drifting
    assert abs(share(stable & ~late, old_fav) - share(stable & late, old_fav)) < 0.1
