"""The batch engine choice (`spark_jobs.engine`) and the two engines against each other.

The known-answer tests of compaction and gold run on both engines (test_compact,
test_interactions); here a messy random bronze goes through both whole jobs and must give
the same silver and gold tables."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest

from lake.config import SparkSettings, load_settings
from lake.tables import Lake
from spark_jobs import compact, interactions
from spark_jobs.engine import choose_engine


def test_auto_picks_arrow_only_for_small_inputs_on_a_local_master(monkeypatch):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    auto = SparkSettings(arrow_max_rows=1000)
    assert choose_engine(auto, 1000) == "arrow"
    assert choose_engine(auto, 1001) == "spark"
    assert choose_engine(auto, None) == "spark"  # the log cannot count: assume big
    cluster = SparkSettings(master="spark://10.0.0.5:7077", arrow_max_rows=1000)
    assert choose_engine(cluster, 10) == "spark"
    assert choose_engine(SparkSettings(engine="spark"), 10) == "spark"
    assert choose_engine(SparkSettings(engine="arrow", arrow_max_rows=0), 10**9) == "arrow"


def test_an_unknown_engine_is_refused_by_the_config():
    with pytest.raises(ValueError, match="engine"):
        load_settings(env={"LAMBDAREC__SPARK__ENGINE": "duckdb"})


T0 = datetime(2026, 5, 1, tzinfo=UTC)
TYPES = ["view", " View", "CLICK", "add_to_cart", "purchase", "rating", "like", ""]


def messy_bronze(n: int, seed: int) -> list[dict]:
    """Retried deliveries (some tied on arrival), bad types, blank ids, NaN/inf values,
    nulls in optional columns, late events; spread over ten dates."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        ts = T0 + timedelta(minutes=rnd.randrange(10 * 24 * 60))
        rows.append(dict(
            event_id=f"e{rnd.randrange(n * 2 // 3)}",  # ~1/3 of the ids repeat
            user_id=rnd.choice([f"u{rnd.randrange(40)}", f"u{rnd.randrange(40)}", "  "]),
            item_id=f"i{rnd.randrange(60)}",
            event_type=rnd.choice(TYPES),
            value=rnd.choice([None, None, 1.0, 3.5, 0.0, float("nan"), float("inf")]),
            ts=ts,
            received_at=ts + timedelta(seconds=rnd.choice([0, 0, 1, 3600, 86_400 * 20])),
            session_id=rnd.choice([None, "s1", "s2"]),
            properties=rnd.choice([None, '{"a": 1}']),
            event_date=ts.date(),
        ))
    return rows


def append_raw(lake: Lake, rows: list[dict]) -> None:
    """Append to bronze without the ingest validation (what an older or foreign writer
    may have left there), so compaction's own checks are what is tested."""
    from deltalake import write_deltalake

    from lake.schemas import BRONZE_EVENTS

    lake.ensure("bronze_events")
    write_deltalake(str(lake.path("bronze_events")),
                    pa.Table.from_pylist(rows, schema=BRONZE_EVENTS.schema), mode="append",
                    partition_by=list(BRONZE_EVENTS.partition_by))


def run_jobs(tmp_path, engine: str, bronze: list[dict], spark) -> Lake:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / engine / "lake")},
        "interactions": {"half_life_days": 3.0}, "spark": {"engine": engine}})
    lake = Lake.from_settings(settings.lake)
    append_raw(lake, bronze[: len(bronze) // 2])
    assert compact.run(settings, spark=spark)["engine"] == engine
    append_raw(lake, bronze[len(bronze) // 2:])
    assert compact.run(settings, spark=spark)["mode"] == "incremental"
    assert interactions.run(settings, as_of=date(2026, 5, 8), spark=spark)["engine"] == engine
    return lake


def test_both_engines_give_the_same_silver_and_gold(spark, tmp_path):
    bronze = messy_bronze(3000, seed=7)
    by_spark = run_jobs(tmp_path, "spark", bronze, spark)
    by_arrow = run_jobs(tmp_path, "arrow", bronze, spark)

    def silver(lake):
        return sorted(lake.read("silver_events").to_pylist(), key=lambda r: r["event_id"])

    s, a = silver(by_spark), silver(by_arrow)
    assert 500 < len(s) < 2000  # duplicates and bad rows are gone, plenty is left
    assert a == s

    def gold(lake):
        return {(r["user_id"], r["item_id"]): r for r in lake.read("gold_interactions").to_pylist()}

    gs, ga = gold(by_spark), gold(by_arrow)
    assert len(gs) > 100 and ga.keys() == gs.keys()
    for key, row in gs.items():
        # sums of the same strengths in another order: equal up to rounding
        assert ga[key]["confidence"] == pytest.approx(row["confidence"], rel=1e-12)
        assert {k: v for k, v in ga[key].items() if k != "confidence"} == \
            {k: v for k, v in row.items() if k != "confidence"}
