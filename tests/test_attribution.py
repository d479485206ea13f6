"""Attribution (spark_jobs.attribution): known answers for the rules, on both engines.

Fixtures are hand-made lists and events whose attribution is stated next to them: window
edges (exactly at the window, one microsecond outside, a list shown after the event), an
explicit id winning over a later window match, an explicit id naming another user's list,
repeated clicks, purchases with price x quantity, and the daily metrics of a small day.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from lake import schemas
from lake.config import load_settings
from lake.tables import Lake
from spark_jobs import attribution as att

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
H = timedelta(hours=1)
WINDOW = 24.0

def imp(rec: str, user: str | None, items: list[str], ts: datetime, *, model: str = "v1",
        strategy: str = "personalised", exp: str = "", arm: str = "",
        surface: str = "recommend") -> dict[str, Any]:
    return {"recommendation_id": rec, "tenant": "", "surface": surface, "user_id": user,
            "anchor_item_id": None,
            "items": [{"item_id": i, "position": p, "score": 1.0 - 0.1 * p}
                      for p, i in enumerate(items)],
            "model_version": model, "strategy": strategy, "experiment_id": exp, "arm": arm,
            "context": "{}", "ts": ts, "impression_date": ts.date()}


def ev(eid: str, user: str, item: str, etype: str, ts: datetime, *, rec: str = "",
       value: float | None = None, tenant: str = "") -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype,
            "value": value, "ts": ts, "received_at": ts, "session_id": None,
            "properties": None, "event_date": ts.date(), "tenant": tenant,
            "recommendation_id": rec}


def impressions_table_of(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schemas.BRONZE_IMPRESSIONS.schema)


EVENT_SCHEMA = schemas.SILVER_EVENTS.schema


def events_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def items_table(prices: dict[str, float | None]) -> pa.Table:
    return pa.table({"item_id": list(prices), "price": pa.array(list(prices.values()),
                                                                pa.float64())})


PRICES = {"A": 12.5, "B": 4.0, "C": None}


@pytest.fixture(params=["arrow", "spark"])
def attribute(request: pytest.FixtureRequest) -> Any:
    """The transform of one engine: (events, impressions, items) -> rows by event id."""
    if request.param == "arrow":
        def go(events: list, impressions: list, prices: dict = PRICES) -> dict[str, dict]:
            out = att.attribute_events_arrow(events_table(events),
                                             impressions_table_of(impressions),
                                             items_table(prices), window_hours=WINDOW)
            return _by_event(out)
        return go
    spark = request.getfixturevalue("spark")

    def go_spark(events: list, impressions: list, prices: dict = PRICES) -> dict[str, dict]:
        df = att.attribute_events(spark.createDataFrame(events_table(events).to_pandas()),
                                  _spark_impressions(spark, impressions),
                                  spark.createDataFrame(items_table(prices).to_pandas()),
                                  window_hours=WINDOW)
        from lake.spark_bridge import conform_df

        return _by_event(_collect(conform_df(df, schemas.GOLD_ATTRIBUTED_EVENTS),
                                  schemas.GOLD_ATTRIBUTED_EVENTS))
    return go_spark


def _collect(df: Any, spec: schemas.TableSpec) -> pa.Table:
    """A DataFrame's rows as an Arrow table of the spec's schema (Spark hands back naive
    datetimes in the session's time zone, UTC)."""
    return pa.Table.from_pylist([r.asDict() for r in df.collect()], schema=spec.schema)


def _spark_impressions(spark: Any, rows: list[dict[str, Any]]) -> Any:
    from lake.spark_bridge import spark_schema

    s = schemas.BRONZE_IMPRESSIONS
    return spark.createDataFrame(
        [tuple(r[c] for c in s.schema.names) for r in rows], spark_schema(s))


def _by_event(t: pa.Table) -> dict[str, dict[str, Any]]:
    rows = t.to_pylist()
    keys = [(r["tenant"], r["event_id"]) for r in rows]
    assert len(keys) == len(set(keys)), "an event was attributed twice"
    return {(r["event_id"] if not r["tenant"] else f"{r['tenant']}/{r['event_id']}"): r
            for r in rows}


# --------------------------------------------------------------------------- the rules


def test_window_edges(attribute: Any) -> None:
    lists = [imp("r1", "u1", ["A", "B"], T0)]
    got = attribute([
        ev("at_edge", "u1", "B", "click", T0 + 24 * H),           # exactly 24 h: in
        ev("outside", "u1", "B", "click", T0 + 24 * H + US),      # 1 us later: out
        ev("before_list", "u1", "A", "click", T0 - US),            # list shown after: out
        ev("same_instant", "u1", "A", "click", T0),                # in
        ev("other_item", "u1", "Z", "click", T0 + H),              # not in the list: out
        ev("other_user", "u9", "A", "click", T0 + H),              # not shown to u9: out
        ev("a_view", "u1", "A", "view", T0 + H),                   # views are not outcomes
    ], lists)
    assert sorted(got) == ["at_edge", "same_instant"]
    assert (got["at_edge"]["recommendation_id"], got["at_edge"]["rule"],
            got["at_edge"]["position"]) == ("r1", "window", 1)
    assert got["same_instant"]["position"] == 0
    assert got["at_edge"]["impression_ts"] == T0
    assert got["at_edge"]["event_date"] == (T0 + 24 * H).date()


def test_window_takes_the_last_list_that_showed_the_item(attribute: Any) -> None:
    lists = [imp("r1", "u1", ["A", "B"], T0, model="v1"),
             imp("r2", "u1", ["B", "A"], T0 + 2 * H, model="v2", exp="e1", arm="chal"),
             imp("r3", "u1", ["C"], T0 + 3 * H, model="v3")]   # later, but no A
    got = attribute([ev("c", "u1", "A", "click", T0 + 4 * H)], lists)
    row = got["c"]
    assert (row["recommendation_id"], row["position"], row["model_version"],
            row["experiment_id"], row["arm"]) == ("r2", 1, "v2", "e1", "chal")


def test_explicit_id_wins_over_a_later_window_match(attribute: Any) -> None:
    lists = [imp("r1", "u1", ["A"], T0, model="v1"), imp("r2", "u1", ["A"], T0 + H, model="v2")]
    got = attribute([ev("named", "u1", "A", "click", T0 + 2 * H, rec="r1"),
                     ev("unnamed", "u1", "A", "click", T0 + 2 * H)], lists)
    assert (got["named"]["recommendation_id"], got["named"]["rule"],
            got["named"]["model_version"]) == ("r1", "explicit", "v1")
    assert (got["unnamed"]["recommendation_id"], got["unnamed"]["rule"]) == ("r2", "window")


def test_explicit_id_is_not_bound_by_the_window(attribute: Any) -> None:
    lists = [imp("old", "u1", ["A"], T0)]
    got = attribute([ev("late", "u1", "A", "purchase", T0 + 72 * H, rec="old")], lists)
    assert got["late"]["rule"] == "explicit"


def test_an_explicit_id_that_does_not_hold_leaves_the_event_unattributed(attribute: Any) -> None:
    lists = [imp("mine", "u1", ["A"], T0), imp("theirs", "u2", ["A"], T0 + H),
             imp("anon", None, ["A"], T0 + H, strategy="similar", surface="similar")]
    got = attribute([
        ev("other_users_list", "u1", "A", "click", T0 + 2 * H, rec="theirs"),
        ev("item_not_in_list", "u1", "B", "click", T0 + 2 * H, rec="mine"),
        ev("unknown_id", "u1", "A", "click", T0 + 2 * H, rec="nope"),
        ev("anonymous_list", "u1", "A", "click", T0 + 2 * H, rec="anon"),
    ], lists)
    # no fallback to the window rule, although "mine" showed A to u1 an hour before
    assert got == {}


def test_repeated_clicks_and_resent_events(attribute: Any) -> None:
    lists = [imp("r1", "u1", ["A", "B"], T0)]
    got = attribute([
        ev("c1", "u1", "A", "click", T0 + H),
        ev("c2", "u1", "A", "click", T0 + 2 * H),     # a second click on the same item
        ev("c1", "u1", "A", "click", T0 + 3 * H),     # c1 resent: the first arrival counts
        ev("c1", "u1", "B", "click", T0 + H, tenant="shop2"),  # another tenant's c1
    ], lists)
    assert sorted(got) == ["c1", "c2", "shop2/c1"]
    assert got["c1"]["ts"] == T0 + H
    assert {r["recommendation_id"] for r in got.values()} == {"r1"}


def test_purchases_earn_price_times_quantity(attribute: Any) -> None:
    lists = [imp("r1", "u1", ["A", "B", "C"], T0)]
    got = attribute([
        ev("three", "u1", "A", "purchase", T0 + H, value=3.0),
        ev("no_value", "u1", "B", "purchase", T0 + H),
        ev("zero", "u1", "A", "purchase", T0 + 2 * H, value=0.0),
        ev("no_price", "u1", "C", "purchase", T0 + H, value=2.0),
        ev("cart", "u1", "A", "add_to_cart", T0 + H, value=5.0),
        ev("click", "u1", "A", "click", T0 + H),
    ], lists)
    assert got["three"]["revenue"] == pytest.approx(37.5)
    assert got["no_value"]["revenue"] == pytest.approx(4.0)
    assert got["zero"]["revenue"] == pytest.approx(12.5)
    assert got["no_price"]["revenue"] is None
    assert got["cart"]["revenue"] is None and got["click"]["revenue"] is None


def test_both_engines_give_the_same_table(spark: Any) -> None:
    import numpy as np

    rng = np.random.default_rng(4)
    lists, events = [], []
    for n in range(60):
        user = f"u{rng.integers(8)}"
        ts = T0 + timedelta(minutes=int(rng.integers(0, 3000)))
        lists.append(imp(f"r{n:03d}", user, [f"i{j}" for j in rng.choice(12, 5, replace=False)],
                         ts, model=f"v{n % 2}", exp="e1" if n % 3 else "",
                         arm="a" if n % 2 else "b"))
    for n in range(300):
        ts = T0 + timedelta(minutes=int(rng.integers(-100, 3200)))
        rec = lists[rng.integers(60)]["recommendation_id"] if rng.random() < 0.3 else ""
        events.append(ev(f"e{n}", f"u{rng.integers(8)}", f"i{rng.integers(12)}",
                         ["click", "add_to_cart", "purchase", "view"][rng.integers(4)], ts,
                         rec=rec, value=float(rng.integers(0, 3)) if rng.random() < 0.5
                         else None))
    prices = {f"i{j}": float(j + 1) for j in range(12)}
    arrow = att.attribute_events_arrow(events_table(events), impressions_table_of(lists),
                                       items_table(prices), window_hours=WINDOW)
    from lake.spark_bridge import conform_df

    sdf = att.attribute_events(spark.createDataFrame(events_table(events).to_pandas()),
                               _spark_impressions(spark, lists),
                               spark.createDataFrame(items_table(prices).to_pandas()),
                               window_hours=WINDOW)
    spark_rows = sorted(_collect(conform_df(sdf, schemas.GOLD_ATTRIBUTED_EVENTS),
                                 schemas.GOLD_ATTRIBUTED_EVENTS).to_pylist(),
                        key=lambda r: (r["tenant"], r["event_id"]))
    arrow_rows = sorted(arrow.to_pylist(), key=lambda r: (r["tenant"], r["event_id"]))
    assert len(arrow_rows) > 40 and {r["rule"] for r in arrow_rows} == {"explicit", "window"}
    assert spark_rows == arrow_rows

    shown = impressions_table_of(lists)
    m_arrow = att.recommendation_metrics_arrow(shown, arrow)
    m_spark = att.recommendation_metrics(_spark_impressions(spark, lists),
                                         spark.createDataFrame(arrow.to_pandas()))
    key = lambda r: tuple("" if r[c] is None else str(r[c]) for c in  # noqa: E731
                          ("impression_date", *att.LIST_KEYS, "position"))
    rows_spark = sorted(_collect(conform_df(m_spark, schemas.GOLD_RECOMMENDATION_METRICS),
                                 schemas.GOLD_RECOMMENDATION_METRICS).to_pylist(), key=key)
    rows_arrow = sorted(m_arrow.to_pylist(), key=key)
    assert len(rows_arrow) > 10
    assert rows_spark == rows_arrow


# --------------------------------------------------------------------------- metrics


def test_daily_metrics_by_arm_and_position() -> None:
    d = T0.date()
    lists = [
        imp("a1", "u1", ["A", "B"], T0, exp="e1", arm="control"),
        imp("a2", "u1", ["B", "A"], T0 + H, exp="e1", arm="control"),
        imp("a3", "u2", ["A", "C"], T0 + H, exp="e1", arm="control"),
        imp("b1", "u3", ["C", "B"], T0, exp="e1", arm="chal", model="v2"),
    ]
    events = [
        ev("x1", "u1", "A", "click", T0 + 2 * H, rec="a1"),   # a1 pos 0
        ev("x2", "u1", "A", "click", T0 + 3 * H, rec="a1"),   # same pair again: 1 click
        ev("x3", "u1", "B", "click", T0 + 2 * H),             # window: a2 pos 0
        ev("x4", "u1", "B", "purchase", T0 + 2 * H, value=2.0),  # a2 pos 0, 2 x 4.0
        ev("x5", "u2", "C", "add_to_cart", T0 + 2 * H),       # a3 pos 1
        ev("x6", "u2", "C", "purchase", T0 + 2 * H),          # a3 pos 1, C has no price
        ev("x7", "u3", "B", "click", T0 + 2 * H),             # b1 pos 1
    ]
    shown = impressions_table_of(lists)
    attributed = att.attribute_events_arrow(events_table(events), shown, items_table(PRICES),
                                            window_hours=WINDOW)
    m = att.recommendation_metrics_arrow(shown, attributed).to_pylist()
    rows = {(r["arm"], r["position"]): r for r in m}
    assert sorted(rows, key=str) == sorted([("control", None), ("control", 0), ("control", 1),
                                            ("chal", None), ("chal", 0), ("chal", 1)], key=str)
    whole = rows[("control", None)]
    assert {k: whole[k] for k in ("impression_date", "model_version", "strategy",
                                  "experiment_id", "impressions", "users", "clicks", "carts",
                                  "purchases", "purchasers", "revenue")} == {
        "impression_date": d, "model_version": "v1", "strategy": "personalised",
        "experiment_id": "e1", "impressions": 3, "users": 2, "clicks": 2, "carts": 1,
        "purchases": 2, "purchasers": 2, "revenue": 8.0}
    assert whole["ctr"] == pytest.approx(2 / 3)
    assert whole["conversion"] == pytest.approx(1.0)
    assert whole["revenue_per_user"] == pytest.approx(4.0)
    p0, p1 = rows[("control", 0)], rows[("control", 1)]
    assert (p0["impressions"], p0["users"], p0["clicks"], p0["purchases"], p0["revenue"]) == \
        (3, 2, 2, 1, 8.0)
    assert (p1["impressions"], p1["users"], p1["clicks"], p1["carts"], p1["purchases"]) == \
        (3, 2, 0, 1, 1)
    chal = rows[("chal", None)]
    assert (chal["model_version"], chal["impressions"], chal["users"], chal["clicks"],
            chal["ctr"], chal["conversion"]) == ("v2", 1, 1, 1, 1.0, 0.0)
    assert rows[("chal", 0)]["clicks"] == 0 and rows[("chal", 1)]["clicks"] == 1


# --------------------------------------------------------------------------- the job


def _settings(tmp_path: Any, engine: str) -> Any:
    return load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")},
        "spark": {"engine": engine, "master": "local[2]", "shuffle_partitions": 1,
                  "driver_memory": "1g"}})


def _seed_lake(lake: Lake) -> None:
    day = T0.date()
    lake.append("bronze_impressions", impressions_table_of([
        imp("r1", "u1", ["A", "B"], T0 - 30 * H),   # the day before: the window reaches it
        imp("r2", "u1", ["A"], T0),
        imp("r3", "u2", ["B"], T0 + H),
    ]))
    silver = events_table([
        ev("e1", "u1", "A", "click", T0 + H),          # r2
        ev("e2", "u1", "B", "click", T0 - 20 * H),     # r1, the day before
        ev("e3", "u2", "B", "purchase", T0 + 2 * H, value=2.0),  # r3: 8.0
        ev("e4", "u1", "B", "click", T0 + 48 * H),     # outside every window
        ev("e5", "u1", "A", "click", T0 + H, rec="r1"),  # named: r1 (the window says r2)
    ])
    lake.append("silver_events", silver)
    lake.append("items", pa.table({
        "item_id": ["A", "B"], "category": ["c", "c"], "price": [12.5, 4.0],
        "available": [True, True], "title": [None, None],
        "updated_at": [T0, T0]}).cast(schemas.ITEMS.schema))
    assert day


@pytest.mark.parametrize("engine", ["arrow", "spark"])
def test_job_rewrites_exactly_its_days_and_a_rerun_changes_nothing(
        tmp_path: Any, engine: str, request: pytest.FixtureRequest) -> None:
    spark = request.getfixturevalue("spark") if engine == "spark" else None
    settings = _settings(tmp_path, engine)
    lake = Lake.from_settings(settings.lake)
    _seed_lake(lake)
    day = T0.date()
    # a metrics row of another day, which the run must leave alone
    keep = date(2026, 10, 1)
    lake.append("gold_recommendation_metrics", pa.Table.from_pylist([{
        "impression_date": keep, "model_version": "v0", "strategy": "personalised",
        "experiment_id": "", "arm": "", "position": None, "impressions": 9, "users": 9,
        "clicks": 0, "carts": 0, "purchases": 0, "purchasers": 0, "revenue": 0.0,
        "ctr": 0.0, "conversion": 0.0, "revenue_per_user": 0.0}],
        schema=schemas.GOLD_RECOMMENDATION_METRICS.schema))

    first = att.run(settings, as_of=day, spark=spark)
    assert (first["engine"], first["start"], first["end"]) == (engine, day - timedelta(1), day)
    assert (first["attributed"], first["window"], first["explicit"], first["claimed"],
            first["unattributed_claims"]) == (4, 3, 1, 1, 0)
    attributed = lake.read("gold_attributed_events")
    metrics = lake.read("gold_recommendation_metrics")

    again = att.run(settings, as_of=day, spark=spark)
    assert again["attributed"] == 4
    key = lambda r: (str(r.get("impression_date")), str(r.get("position")),  # noqa: E731
                     r.get("event_id", ""), r["model_version"])
    assert sorted(lake.read("gold_attributed_events").to_pylist(), key=key) == \
        sorted(attributed.to_pylist(), key=key)
    assert sorted(lake.read("gold_recommendation_metrics").to_pylist(), key=key) == \
        sorted(metrics.to_pylist(), key=key)

    by_event = {r["event_id"]: r for r in attributed.to_pylist()}
    assert {e: r["recommendation_id"] for e, r in by_event.items()} == \
        {"e1": "r2", "e2": "r1", "e3": "r3", "e5": "r1"}
    assert by_event["e3"]["revenue"] == pytest.approx(8.0)
    whole = {(str(r["impression_date"]), r["position"]): r for r in metrics.to_pylist()
             if r["position"] is None}
    assert whole[(str(keep), None)]["impressions"] == 9   # untouched
    today = whole[(str(day), None)]
    assert (today["impressions"], today["users"], today["clicks"], today["purchases"],
            today["revenue"]) == (2, 2, 1, 1, 8.0)
    yesterday = whole[(str(day - timedelta(1)), None)]
    assert (yesterday["impressions"], yesterday["clicks"]) == (1, 2)  # e2 and e5


def test_job_arguments_are_checked(tmp_path: Any) -> None:
    from spark_jobs.cli import JobError

    settings = _settings(tmp_path, "arrow")
    with pytest.raises(JobError, match="both --start and --end"):
        att.run(settings, start=T0.date())
    with pytest.raises(JobError, match="not both"):
        att.run(settings, start=T0.date(), end=T0.date(), as_of=T0.date())
    assert att.main(["--start", "2026-11-02", "--end", "2026-11-01"]) == 2


def test_settling_days_follow_the_window(tmp_path: Any) -> None:
    s = load_settings(env={}, overrides={"attribution": {"window_hours": 30}})
    days = att.plan_days(s, start=None, end=None, as_of=date(2026, 11, 20))
    assert days == [date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)]
