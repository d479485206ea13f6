"""`python -m lake.sql`: SQL over the lake, time travel, table listing, history, clean errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lake.sql import main, parse_versions, referenced_tables
from lake.tables import Lake
from lake.validation import events_to_table

ROOT = Path(__file__).resolve().parent.parent


def ev(i: int, day: int, etype: str, value: float | None = None) -> dict:
    return {"event_id": f"e{i}", "user_id": f"u{i % 2}", "item_id": f"i{i % 3}",
            "event_type": etype, "value": value, "ts": datetime(2024, 2, day, 9, i, tzinfo=UTC)}


@pytest.fixture
def filled(lake: Lake) -> Lake:
    lake.append("bronze_events", events_to_table(
        [ev(1, 1, "view"), ev(2, 1, "view"), ev(3, 2, "purchase", 12.5)]))  # version 1
    lake.append("bronze_events", events_to_table(
        [ev(4, 2, "click"), ev(5, 3, "view")]))  # version 2
    return lake


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lake.sql", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_query_prints_aligned_table(filled: Lake) -> None:
    out = cli("--lake", str(filled.root),
              "SELECT event_type, count(*) AS n FROM bronze_events GROUP BY event_type "
              "ORDER BY n DESC, event_type")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "event_type | n",
        "-----------+--",
        "view       | 3",
        "click      | 1",
        "purchase   | 1",
        "(3 rows)",
    ]


def test_errors_are_one_line_exit_2(filled: Lake) -> None:
    bad = cli("--lake", str(filled.root), "SELEC * FROM bronze_events")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")
    unknown = cli("--lake", str(filled.root), "SELECT * FROM no_such_table")
    assert unknown.returncode == 2
    assert "no_such_table" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_formats_and_time_travel(filled: Lake, capsys) -> None:
    root = str(filled.root)
    q = "SELECT event_id, value, ts, event_date FROM bronze_events ORDER BY event_id"
    rc, out, _ = run_main(capsys, "--lake", root, "--format", "json", "--version", "1", q)
    assert rc == 0
    assert json.loads(out) == [
        {"event_id": "e1", "value": None, "ts": "2024-02-01T09:01:00+00:00",
         "event_date": "2024-02-01"},
        {"event_id": "e2", "value": None, "ts": "2024-02-01T09:02:00+00:00",
         "event_date": "2024-02-01"},
        {"event_id": "e3", "value": 12.5, "ts": "2024-02-02T09:03:00+00:00",
         "event_date": "2024-02-02"},
    ]
    rc, out, _ = run_main(capsys, "--lake", root, "--format", "csv",
                          "--version", "bronze_events=2", "SELECT event_id FROM bronze_events "
                          "WHERE event_date = DATE '2024-02-02' ORDER BY event_id")
    assert rc == 0
    assert list(csv.reader(io.StringIO(out))) == [["event_id"], ["e3"], ["e4"]]
    rc, _, err = run_main(capsys, "--lake", root, "--version", "99", q)
    assert rc == 2 and err == ("error: bronze_events has no version 99: its versions go up "
                               "to 2\n")  # was delta-kernel's internal error text
    rc, _, err = run_main(capsys, "--lake", root, "--version", "yesterday", q)
    assert rc == 2 and err == ("error: bronze_events: cannot time-travel to 'yesterday': "
                               "expected a version number or an ISO-8601 timestamp\n")


def test_tables_and_history(filled: Lake, capsys) -> None:
    rc, out, _ = run_main(capsys, "--lake", str(filled.root), "--tables")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "table"
    bronze = next(ln for ln in lines if ln.startswith("bronze_events"))
    assert [c.strip() for c in bronze.split("|")] == ["bronze_events", "2", "5", "4",
                                                      "event_date"]
    items = next(ln for ln in lines if ln.startswith("items "))
    assert [c.strip() for c in items.split("|")][1:4] == ["NULL", "0", "0"]

    rc, out, _ = run_main(capsys, "--lake", str(filled.root), "--format", "json",
                          "--history", "bronze_events")
    assert rc == 0
    hist = json.loads(out)
    assert [h["version"] for h in hist] == [2, 1, 0]
    assert [h["operation"] for h in hist] == ["WRITE", "WRITE", "CREATE TABLE"]
    rc, _, err = run_main(capsys, "--lake", str(filled.root), "--history", "nope")
    assert rc == 2 and "unknown table 'nope'" in err


def test_version_argument_parsing() -> None:
    sql = "SELECT * FROM bronze_events b JOIN items i ON b.item_id = i.item_id"
    assert referenced_tables(sql) == ["bronze_events", "items"]
    assert parse_versions(["bronze_events=3", "items=2024-01-01T00:00:00Z"], sql) == {
        "bronze_events": 3, "items": "2024-01-01T00:00:00Z"}
    assert parse_versions(["4"], "select count(*) from silver_events") == {"silver_events": 4}
    with pytest.raises(Exception, match="references 2 tables"):
        parse_versions(["3"], sql)
