"""Bulk loading sample data into a real lake: counts, idempotence, replacement, CLI."""

from __future__ import annotations

import json
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lake import load
from lake.config import Settings, load_settings
from lake.tables import Lake
from lake.validation import events_to_table

END = date(2026, 11, 20)


def _settings(root: Path, **data: Any) -> Settings:
    base = {"source": "synthetic", "synthetic_events": 6_000, "synthetic_users": 100,
            "synthetic_items": 60, "seed": 4}
    return load_settings(env={}, overrides={"lake": {"root": str(root)}, "data": base | data})


def _ids(lake: Lake) -> pa.ChunkedArray:
    return lake.read("bronze_events", columns=["event_id"]).column("event_id")


def test_loads_synthetic_then_does_nothing(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    lake = Lake(tmp_path)
    first = load.ensure_sample_data(s, days=5, end=END)
    assert first["loaded"] is True
    assert (first["events"], first["items"], first["commits"]) == (6_000, 60, 1)
    assert lake.count("bronze_events") == 6_000
    assert lake.count("items") == 60
    version = lake.version("bronze_events")
    second = load.ensure_sample_data(s, days=5, end=END)
    assert second["loaded"] is False and "already holds 6000" in second["reason"]
    assert lake.count("bronze_events") == 6_000
    assert lake.version("bronze_events") == version


def test_force_replaces_without_duplicates_and_keeps_online_events(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    lake = Lake(tmp_path)
    load.ensure_sample_data(s, days=5, end=END)
    online = events_to_table([{
        "event_id": "web-42", "user_id": "u1", "item_id": "i1", "event_type": "view",
        "ts": datetime(2026, 11, 20, 12, tzinfo=UTC)}])
    lake.append("bronze_events", online)
    again = load.ensure_sample_data(s, force=True, days=5, end=END)
    assert again["loaded"] is True and again["deleted_events"] == 6_000
    ids = _ids(lake)
    assert len(ids) == 6_001 and pc.count_distinct(ids).as_py() == 6_001
    assert "web-42" in ids.to_pylist()
    assert lake.count("items") == 60  # upserted, not appended


def test_large_loads_commit_in_few_big_appends(tmp_path: Path) -> None:
    s = _settings(tmp_path, synthetic_events=10_000)
    lake = Lake(tmp_path)
    out = load.ensure_sample_data(s, days=3, end=END, commit_rows=4_000)
    assert out["commits"] == 3  # 4000 + 4000 + 2000
    assert lake.count("bronze_events") == 10_000
    hist = lake.delta("bronze_events").history()
    assert sum(1 for h in hist if h.get("operation") == "WRITE") == 3


def test_concurrent_loaders_load_once(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(
        load.ensure_sample_data(s, days=5, end=END))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["loaded"] for r in results) == [False, True]
    assert Lake(tmp_path).count("bronze_events") == 6_000


def test_movielens_100k_into_lake_and_switching_source(tmp_path: Path) -> None:
    data_dir = load_settings().data.dir
    if not (data_dir / "ml-100k").is_dir():
        pytest.skip(f"MovieLens ml-100k not found at {data_dir / 'ml-100k'}")
    lake = Lake(tmp_path)
    load.ensure_sample_data(_settings(tmp_path), days=5, end=END)
    s = _settings(tmp_path, source="ml-100k", dir=str(data_dir))
    out = load.ensure_sample_data(s, force=True)
    assert (out["events"], out["items"], out["deleted_events"]) == (100_000, 1_682, 6_000)
    assert lake.count("bronze_events") == 100_000
    users = lake.read("bronze_events", columns=["user_id"]).column("user_id")
    assert pc.count_distinct(users).as_py() == 943
    assert load.ensure_sample_data(s)["loaded"] is False
    assert lake.count("bronze_events") == 100_000


def test_cli_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--lake", str(tmp_path), "--source", "synthetic", "--events", "3000", "--users",
            "40", "--items", "30", "--seed", "9", "--days", "3", "--end", "2026-11-20"]
    assert load.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert (out["loaded"], out["events"], out["items"], out["source"]) == (
        True, 3_000, 30, "synthetic")
    assert load.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["loaded"] is False
    assert load.main([*argv, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["bronze_events"] == 3_000


def test_cli_missing_data_dir_exits_2_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    rc = load.main(["--lake", str(tmp_path / "lake"), "--source", "ml-1m",
                    "--data-dir", str(missing)])
    assert rc == 2
    assert str(missing / "ml-1m") in capsys.readouterr().err
    assert Lake(tmp_path / "lake").count("bronze_events") == 0
