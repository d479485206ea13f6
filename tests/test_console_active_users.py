"""The console's home-page users: the latest event date from bronze's Delta log, then only
that day's partition is read (`ConsoleData.active_users`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from lake.config import load_settings
from lake.tables import Lake
from lake.validation import events_to_table
from online.console.data import ConsoleData


def _data(lake: Lake) -> ConsoleData:
    # Only the lake is read; the API client is built but never called (no server needed).
    server = SimpleNamespace(lake=lake, settings=load_settings(env={}, path=None),
                             ports={"grpc": 1, "admin": 2}, public_key=None)
    return ConsoleData(server)


def _events(day: int, users: list[str]) -> list[dict]:
    return [{"event_id": f"e{day}-{i}", "user_id": u, "item_id": "i1", "event_type": "view",
             "ts": datetime(2025, 3, day, 10, i, tzinfo=UTC)} for i, u in enumerate(users)]


def test_latest_day_comes_from_the_log_and_only_its_partition_is_read(lake: Lake) -> None:
    data = _data(lake)
    try:
        assert data.active_users(5) == []  # no bronze table yet
        lake.append("bronze_events", events_to_table(_events(1, ["old"] * 5)))
        lake.append("bronze_events", events_to_table(_events(2, ["old", "older"])))
        lake.append("bronze_events", events_to_table(
            _events(3, ["u3", "u5", "u4", "u5", "u3"])))
        # The older days' files vanish from disk while the log still lists them: a reader
        # that scans bronze's event_date column to find the latest day fails on them; one
        # that takes the day from the log's partition values reads only 2025-03-03's files.
        for part in ("event_date=2025-03-01", "event_date=2025-03-02"):
            for f in Path(lake.path("bronze_events"), part).glob("*.parquet"):
                f.unlink()
        assert data.active_users(2) == ["u3", "u5"]  # 2 events each, ties by user id
        assert data.active_users(10) == ["u3", "u5", "u4"]
    finally:
        data.close()
