"""One as-of rule for `make pipeline` and the DAG's manual runs (`lake.as_of`)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from lake.as_of import default_as_of

RUN = datetime(2026, 12, 4, 3, 10, tzinfo=UTC)


def test_default_as_of_is_the_last_complete_day_or_the_end_of_older_data() -> None:
    assert default_as_of(RUN, None) == date(2026, 12, 3)
    # events up to today: today is not complete, yesterday is the cut
    assert default_as_of(RUN, (date(2026, 11, 1), date(2026, 12, 4))) == date(2026, 12, 3)
    # a dump that ended long ago (MovieLens): its last day
    assert default_as_of(RUN, (date(2000, 4, 25), date(2003, 2, 28))) == date(2003, 2, 28)
    # a lake filled through the API today only: today, there is nothing else to learn from
    assert default_as_of(RUN, (date(2026, 12, 4), date(2026, 12, 4))) == date(2026, 12, 4)
    with pytest.raises(ValueError, match="timezone-aware"):
        default_as_of(datetime(2026, 12, 4), None)


def test_manual_dag_runs_and_make_pipeline_pick_the_same_day(tmp_path: Path) -> None:
    from dags.lambdarec_common import plan_run

    bounds = (date(2000, 4, 25), date(2003, 2, 28))
    plan = plan_run(dag_id="d", run_id="manual__x", logical_date=None, run_after=RUN,
                    params={}, models_dir=tmp_path, event_bounds=bounds)
    assert plan["as_of"] == default_as_of(RUN, bounds).isoformat() == "2003-02-28"
    assert plan["version"].startswith("v20030228-")
    # a scheduled run keeps its own data interval
    scheduled = plan_run(dag_id="d", run_id="scheduled__x",
                         logical_date=datetime(2026, 12, 2, tzinfo=UTC), run_after=RUN,
                         params={}, models_dir=tmp_path, event_bounds=bounds)
    assert scheduled["as_of"] == "2026-12-02"


def test_pipeline_summary_says_what_it_read_and_bronze_bounds(tmp_path: Path) -> None:
    """`"data"` names the sample just loaded into an empty lake, else `lake` (events sent
    through the API or loaded before); the as-of rule reads bronze's date range."""
    from lake import load
    from lake.as_of import event_date_bounds
    from lake.config import load_settings
    from lake.tables import Lake
    from spark_jobs.pipeline import data_read

    data = {"source": "synthetic", "synthetic_events": 3_000, "synthetic_users": 50,
            "synthetic_items": 40, "seed": 4}
    s = load_settings(env={}, overrides={"lake": {"root": str(tmp_path)}, "data": data})
    assert event_date_bounds(Lake(tmp_path)) is None  # no bronze yet
    assert data_read(load.ensure_sample_data(s, days=5, end=date(2026, 11, 20))) == "synthetic"
    assert data_read(load.ensure_sample_data(s, days=5, end=date(2026, 11, 20))) == "lake"
    assert event_date_bounds(Lake(tmp_path)) == (date(2026, 11, 16), date(2026, 11, 20))
    none = load_settings(env={}, overrides={"lake": {"root": str(tmp_path)},
                                            "data": {"source": "none"}})
    assert data_read(load.ensure_sample_data(none)) == "lake"
