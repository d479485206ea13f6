"""Gold interactions: hand-computed strengths (values, decay from the user's latest event),
windows, caps, idempotent partition rewrite."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest
from pyspark.sql.types import DoubleType, StringType, StructField, StructType, TimestampType

from lake.config import load_settings
from lake.strength import StrengthParams
from lake.tables import Lake
from spark_jobs import interactions
from spark_jobs.interactions import build_interactions, build_interactions_arrow

AS_OF = date(2026, 1, 31)
END = datetime(2026, 2, 1, tzinfo=UTC)  # the end of the as-of day
WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "rating": 0.0}

EVENTS = StructType([
    StructField("user_id", StringType()),
    StructField("item_id", StringType()),
    StructField("event_type", StringType()),
    StructField("value", DoubleType()),
    StructField("ts", TimestampType()),
])


EVENTS_ARROW = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                          ("event_type", pa.string()), ("value", pa.float64()),
                          ("ts", pa.timestamp("us", tz="UTC"))])


@pytest.fixture(params=["spark", "arrow"])
def engine(request):
    return request.param


@pytest.fixture()
def build(engine, spark):
    """Events -> {(user, item): gold row} with the engine of the test's parameter."""
    def run(rows, weights=WEIGHTS, transforms=None, half_life_days=30.0, max_confidence=100.0,
            lookback_days=90):
        params = StrengthParams(weights, transforms or {}, half_life_days, max_confidence)
        rows = [r if len(r) == 5 else (*r[:3], None, r[3]) for r in rows]
        if engine == "spark":
            df = build_interactions(spark.createDataFrame(rows, EVENTS), params=params,
                                    as_of=AS_OF, lookback_days=lookback_days)
            return {(r["user_id"], r["item_id"]): r.asDict() for r in df.collect()}
        table = pa.Table.from_pylist(
            [dict(zip(EVENTS_ARROW.names, r, strict=True)) for r in rows], schema=EVENTS_ARROW)
        out = build_interactions_arrow(table, params=params, as_of=AS_OF,
                                       lookback_days=lookback_days)
        return {(r["user_id"], r["item_id"]): r for r in out.to_pylist()}
    return run


def test_confidence_known_values(build):
    """Decay runs from each user's latest counted event (not from the as-of date)."""
    rows = [
        # u1's latest event is the click (END - 15 d): the purchase is 45 days older,
        # 1.5 half-lives: 8 x 2 ** -1.5; the view half a half-life: 2 ** -0.5; the click 2
        ("u1", "i1", "purchase", END - timedelta(days=60)),
        ("u1", "i2", "view", END - timedelta(days=30)),
        ("u1", "i2", "click", END - timedelta(days=15)),
        # at the very end of the as-of day: excluded; so the purchase is u2's latest: 8
        ("u2", "i1", "add_to_cart", END),
        ("u2", "i1", "purchase", END - timedelta(days=30)),
        # older than the 90-day lookback: excluded, so no pair at all
        ("u2", "i3", "view", END - timedelta(days=91)),
        # weight 0 (rating): ignored, no pair
        ("u3", "i1", "rating", END - timedelta(days=1)),
        # 20 fresh purchases: 160 before the cap of 100
        *[("u3", "i2", "purchase", END - timedelta(hours=1))] * 20,
        # exactly at the lookback boundary: included; u4's only event, so age 0 -> 1
        ("u4", "i4", "view", END - timedelta(days=90)),
    ]
    out = build(rows)
    assert set(out) == {("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u3", "i2"), ("u4", "i4")}
    assert out[("u1", "i1")]["confidence"] == pytest.approx(8 * 2 ** -1.5, abs=1e-12)
    assert out[("u1", "i1")]["n_events"] == 1
    assert out[("u1", "i2")]["confidence"] == pytest.approx(2 ** -0.5 + 2.0, abs=1e-12)
    assert out[("u1", "i2")]["n_events"] == 2
    assert out[("u1", "i2")]["last_ts"].timestamp() == (END - timedelta(days=15)).timestamp()
    assert out[("u2", "i1")]["confidence"] == pytest.approx(8.0, abs=1e-12)
    assert out[("u2", "i1")]["n_events"] == 1
    assert out[("u3", "i2")]["confidence"] == 100.0
    assert out[("u3", "i2")]["n_events"] == 20
    assert out[("u4", "i4")]["confidence"] == pytest.approx(1.0, abs=1e-12)
    assert {r["as_of"] for r in out.values()} == {AS_OF}


def test_values_count_through_their_transform(build):
    rows = [
        ("u1", "i1", "rating", 4.0, END - timedelta(days=1)),     # linear: 4
        ("u1", "i2", "purchase", 3.0, END - timedelta(days=1)),   # log1p: 2 * log2(4) = 4
        ("u1", "i3", "purchase", None, END - timedelta(days=1)),  # no value: 2 * 1
        ("u1", "i4", "rating", 0.0, END - timedelta(days=1)),     # value 0: no pair
    ]
    out = build(rows, weights={"rating": 1.0, "purchase": 2.0},
                transforms={"rating": "linear", "purchase": "log1p"}, half_life_days=None)
    assert set(out) == {("u1", "i1"), ("u1", "i2"), ("u1", "i3")}
    assert out[("u1", "i1")]["confidence"] == pytest.approx(4.0, abs=1e-12)
    assert out[("u1", "i2")]["confidence"] == pytest.approx(4.0, abs=1e-12)
    assert out[("u1", "i3")]["confidence"] == pytest.approx(2.0, abs=1e-12)


def test_a_backfilled_history_keeps_its_weight(build):
    """Two years before the as-of date, but all the user has: no decay to nothing."""
    old = END - timedelta(days=730)
    rows = [("u1", "i1", "view", old), ("u1", "i2", "view", old - timedelta(days=30))]
    out = build(rows, lookback_days=3650)
    assert out[("u1", "i1")]["confidence"] == pytest.approx(1.0, abs=1e-12)
    assert out[("u1", "i2")]["confidence"] == pytest.approx(0.5, abs=1e-12)


def test_all_zero_weights_is_an_error(build):
    from spark_jobs.cli import JobError

    with pytest.raises(JobError, match="weight 0"):
        build([], weights={"view": 0.0})


# -- the job -----------------------------------------------------------------------------
def silver_rows() -> list[dict]:
    base = [
        ("e1", "u1", "i1", "purchase", END - timedelta(days=60)),
        ("e2", "u1", "i2", "view", END - timedelta(days=30)),
        ("e3", "u2", "i1", "view", END - timedelta(days=2)),
        ("e4", "u2", "i2", "click", END + timedelta(hours=5)),  # after AS_OF: next day only
    ]
    return [dict(event_id=e, user_id=u, item_id=i, event_type=t, value=None, ts=ts,
                 received_at=ts + timedelta(seconds=1)) for e, u, i, t, ts in base]


def gold(lake: Lake, as_of: date | None = None) -> list[dict]:
    rows = lake.read("gold_interactions").to_pylist()
    if as_of is not None:
        rows = [r for r in rows if r["as_of"] == as_of]
    return sorted(rows, key=lambda r: (r["as_of"], r["user_id"], r["item_id"]))


def test_interactions_job_rewrites_only_its_partition(spark, engine, tmp_path):
    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                                "interactions": {"half_life_days": 30.0},
                                                "spark": {"engine": engine}})
    lake = Lake.from_settings(settings.lake)
    lake.append("silver_events", pa.Table.from_pylist(silver_rows()))

    res = interactions.run(settings, as_of=AS_OF, spark=spark)
    assert res["engine"] == engine
    assert res["pairs"] == 3 and res["events"] == 3
    first = gold(lake)
    conf = {(r["user_id"], r["item_id"]): r["confidence"] for r in first}
    # u1's latest is the view (END - 30 d): the purchase one half-life before it
    assert conf[("u1", "i1")] == pytest.approx(4.0, abs=1e-12)
    assert conf[("u1", "i2")] == pytest.approx(1.0, abs=1e-12)
    assert conf[("u2", "i1")] == pytest.approx(1.0, abs=1e-12)

    next_day = AS_OF + timedelta(days=1)
    interactions.run(settings, as_of=next_day, spark=spark)
    both = gold(lake)
    nxt = {(r["user_id"], r["item_id"]): r["confidence"] for r in gold(lake, next_day)}
    assert len(nxt) == 4
    # u2's click (END + 5 h) is now their latest: the view is 2 days 5 hours older
    assert nxt[("u2", "i1")] == pytest.approx(2 ** (-(2 + 5 / 24) / 30), abs=1e-12)
    assert nxt[("u2", "i2")] == pytest.approx(2.0, abs=1e-12)
    assert gold(lake, AS_OF) == first

    interactions.run(settings, as_of=AS_OF, spark=spark)  # rerun: same rows, nothing added
    assert gold(lake) == both


def test_a_rerun_on_unchanged_inputs_reuses_the_partition_and_a_change_rebuilds_it(
        spark, engine, tmp_path):
    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                                "interactions": {"half_life_days": 30.0},
                                                "spark": {"engine": engine}})
    lake = Lake.from_settings(settings.lake)
    lake.append("silver_events", pa.Table.from_pylist(silver_rows()))
    built = interactions.run(settings, as_of=AS_OF, spark=spark)
    assert built["reused"] is False

    again = interactions.run(settings, as_of=AS_OF, spark=spark)
    assert again["reused"] is True and again["gold_version"] == built["gold_version"]
    assert {k: again[k] for k in ("pairs", "events", "users", "items")} == {
        "pairs": 3, "events": 3, "users": 2, "items": 2}

    # other strength settings: the partition was built from something else
    halved = settings.model_copy(update={"interactions": settings.interactions.model_copy(
        update={"half_life_days": 15.0})})
    other = interactions.run(halved, as_of=AS_OF, spark=spark)
    assert other["reused"] is False
    assert {(r["user_id"], r["item_id"]): r["confidence"] for r in gold(lake, AS_OF)}[
        ("u1", "i1")] == pytest.approx(8.0 * 2 ** (-30 / 15), abs=1e-12)
    # ...and back: rebuilt again, not mistaken for the first build
    assert interactions.run(settings, as_of=AS_OF, spark=spark)["reused"] is False

    # a new silver event: rebuilt; --rebuild: rebuilt even on the same inputs
    lake.append("silver_events", pa.Table.from_pylist([dict(
        event_id="e5", user_id="u3", item_id="i1", event_type="view", value=None,
        ts=END - timedelta(days=1), received_at=END - timedelta(days=1))]))
    grown = interactions.run(settings, as_of=AS_OF, spark=spark)
    assert grown["reused"] is False and grown["pairs"] == 4
    assert interactions.run(settings, as_of=AS_OF, spark=spark, rebuild=True)["reused"] is False
