"""`python -m bench.run`: a failing section says FAILED (not "done") and fails the run; the
scratch space works on a fresh clone where `var/bench` does not exist yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def test_echo_with_search_answers_the_request_bytes_after_searching(tmp_path: Path) -> None:
    """`python -m bench.echo --search`: a real server over a real index echoes each call;
    a missing --queries is one clear usage error."""
    import subprocess
    import sys

    import faiss
    import grpc
    import numpy as np

    from bench.echo import METHOD
    from lake.config import PROJECT_ROOT
    from online.ports import free_port

    vectors = np.eye(4, dtype=np.float32)
    index = faiss.IndexHNSWFlat(4, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "items.faiss"))
    np.save(tmp_path / "queries.npy", vectors[:2])

    bad = subprocess.run([sys.executable, "-m", "bench.echo", "--search",
                          str(tmp_path / "items.faiss")], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--search needs --queries" in bad.stderr

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo", "--port", str(port),
                             "--search", str(tmp_path / "items.faiss"), "--queries",
                             str(tmp_path / "queries.npy"), "--fetch", "2"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "echo listening" in (proc.stdout.readline() if proc.stdout else "")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(METHOD)
            assert [call(b"abc%d" % i, timeout=10) for i in range(3)] == [
                b"abc0", b"abc1", b"abc2"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.slow
def test_training_section_runs_on_a_tiny_lake_with_the_default_regularization(
        tmp_path: Path) -> None:
    """`make bench`'s training section end to end (our train step, raw implicit, MLlib) on
    a small synthetic lake, with `train.regularization` left at its default (null): the raw
    implicit fit resolves it as the trainer does instead of handing implicit None."""
    from bench import training
    from lake.config import load_settings
    from spark_jobs import pipeline

    settings = load_settings(env={}, path=None, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "data": {"source": "synthetic", "synthetic_events": 3_000, "synthetic_users": 120,
                 "synthetic_items": 80},
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g"},
        "tune": {"enabled": False}, "train": {"iterations": 3},
        "airflow": {"reload_targets": ["127.0.0.1:1"]}})  # no server is told to reload
    assert settings.train.regularization is None

    def tiny(data: str) -> dict[str, Any]:
        assert data == "synthetic-tiny"
        return {"settings": settings,
                "summary": pipeline.run(settings, data="synthetic", force=True)}

    report = Report(tmp_path / "report")
    out: dict[str, Any] = {}
    timings, failed = run_sections({"training": lambda r: out.update(training.run(
        r, datasets=("synthetic-tiny",), mllib_iterations=2, pipelines=tiny))}, report)
    assert failed == []
    res = out["synthetic-tiny"]
    assert res["raw_implicit_s"] > 0 and res["mllib_s"] > 0 and res["export_s"] > 0
    names = {f.name for f in report.figures}
    assert "training.synthetic-tiny.ours.s_per_iter" in names
    assert "training.synthetic-tiny.mllib.marginal_s_per_iter" in names
