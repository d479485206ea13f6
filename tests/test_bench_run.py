"""`python -m bench.run`: a failing section says FAILED (not "done") and fails the run; the
scratch space works on a fresh clone where `var/bench` does not exist yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fixtures
from bench.report import Report
from bench.run import run_sections


def test_a_failing_section_is_reported_failed_and_the_others_still_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = []

    def broken(r: Report) -> None:
        raise FileNotFoundError("var/bench/x missing")

    def fine(r: Report) -> None:
        ran.append("fine")

    timings, failed = run_sections({"broken": broken, "fine": fine}, Report(tmp_path))
    err = capsys.readouterr().err
    assert failed == ["broken"] and ran == ["fine"]
    assert [n for n, _ in timings] == ["broken", "fine"]
    assert "[bench] section broken FAILED (FileNotFoundError: var/bench/x missing) in" in err
    assert "section broken done" not in err
    assert "[bench] section fine done in" in err


def test_scratch_space_is_created_on_a_fresh_clone(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = tmp_path / "clone" / "var" / "bench"
    monkeypatch.setattr(fixtures, "CACHE_DIR", fresh)
    work = fixtures.scratch_dir("online-")
    assert work.is_dir() and work.parent == fresh and work.name.startswith("online-")
