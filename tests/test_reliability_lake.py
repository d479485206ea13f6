"""Concurrent writers on one lake lose no commit.

Three writers run at once on a fresh lake:

* an `IngestPipeline` (WAL -> bronze, flushing every 50 ms) fed by a thread of this process;
* a second process appending small batches to bronze with `Lake.append`;
* the Spark compact job (`spark_jobs.compact.run`) rewriting silver from bronze, twice.

Afterwards bronze holds every acknowledged event exactly once and nothing else, each
acknowledged batch lies wholly inside one commit, the Delta log's versions are contiguous
with one commit per acknowledged write (no lost or extra append), the pipeline's Delta
application transaction names the last WAL record it committed, and a final compaction
puts every event in silver once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest

from lake.config import load_settings
from lake.tables import Lake
from online.ingest import IngestOverloadedError, IngestPipeline
from spark_jobs import compact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCHES = 10_000  # per writer: the loops end on `stop`, or here whatever happens
WRITE_PAUSE_S = 0.02

APPENDER = textwrap.dedent("""
    import json, sys, threading
    from datetime import UTC, datetime, timedelta
    import pyarrow as pa
    from lake.tables import Lake
    spec = json.loads(sys.argv[1])
    lake = Lake(spec["root"])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    now = datetime.now(UTC)
    print("READY", flush=True)
    for b in range(spec["max_batches"]):
        if stop.is_set():
            break
        ids = [f"proc-{b}-{i}" for i in range(1 + b % 5)]
        rows = [{"event_id": e, "user_id": f"pu{b % 3}", "item_id": f"i{i}",
                 "event_type": "view", "ts": now - timedelta(hours=(7 * b + i) % 40)}
                for i, e in enumerate(ids)]
        version = lake.append("bronze_events", pa.Table.from_pylist(rows))
        print("ACK", json.dumps({"version": version, "ids": ids}), flush=True)
        stop.wait(spec["pause_s"])
    print("DONE", flush=True)
""")


class Appender:
    """The second process; `acks` are the batches whose Lake.append returned."""

    def __init__(self, root: Path, stderr: Path) -> None:
        spec = {"root": str(root), "max_batches": MAX_BATCHES, "pause_s": WRITE_PAUSE_S}
        self.stderr = stderr
        with stderr.open("w") as err:  # a file: a chatty child can never block on a pipe
            self.proc = subprocess.Popen([sys.executable, "-c", APPENDER, json.dumps(spec)],
                                         cwd=ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self.ready = threading.Event()
        self.acks: list[dict] = []
        self.done = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            tag, _, body = line.strip().partition(" ")
            if tag == "READY":
                self.ready.set()
            elif tag == "ACK":
                self.acks.append(json.loads(body))
            elif tag == "DONE":
                self.done = True
        self.ready.set()  # EOF: never leave a waiter hanging

    def stop(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF ends the child's loop
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return self.stderr.read_text()


class Ingester:
    """Feeds the pipeline small batches of fresh events; `acks` are the accepted batches."""

    def __init__(self, pipeline: IngestPipeline) -> None:
        self.pipeline = pipeline
        self.stop = threading.Event()
        self.acks: list[list[str]] = []
        self.error: BaseException | None = None
        self.overloaded = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        now = datetime.now(UTC)
        try:
            for b in range(MAX_BATCHES):
                if self.stop.is_set():
                    break
                batch = [{"event_id": f"wal-{b}-{i}", "user_id": f"wu{b % 4}",
                          "item_id": f"i{i}", "event_type": "click",
                          "ts": now - timedelta(hours=(5 * b + i) % 40)}
                         for i in range(1 + b % 8)]
                while True:
                    try:
                        result = self.pipeline.ingest(batch)
                        break
                    except IngestOverloadedError:  # back-pressure: nothing acknowledged
                        self.overloaded += 1
                        if self.stop.wait(0.05):
                            return
                assert not result.rejected and result.duplicates == 0, result
                self.acks.append([e["event_id"] for e in result.accepted])
                self.stop.wait(WRITE_PAUSE_S)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def commits(lake: Lake, name: str) -> dict[int, list[str]]:
    """Delta log version -> event_ids its add actions brought in (read from the files)."""
    log = lake.path(name) / "_delta_log"
    out: dict[int, list[str]] = {}
    for f in sorted(log.glob("*.json")):
        ids: list[str] = []
        for line in f.read_text().splitlines():
            add = json.loads(line).get("add")
            if add:
                path = lake.path(name) / add["path"]
                ids += pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist()
        out[int(f.stem)] = ids
    return out


@pytest.mark.slow
def test_concurrent_writers_lose_no_commit(spark, tmp_path: Path) -> None:
    run_writers(spark, tmp_path, compactions_under_load=1)


@pytest.mark.reliability
def test_concurrent_writers_lose_no_commit_soak(spark, tmp_path: Path) -> None:
    run_writers(spark, tmp_path, compactions_under_load=4)


def run_writers(spark: SparkSession, tmp_path: Path, *, compactions_under_load: int) -> None:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")},
        "model": {"dir": str(tmp_path / "models")},
        "server": {"wal_dir": str(tmp_path / "wal"), "flush_interval_s": 0.05,
                   "flush_max_events": 200, "wal_fsync_interval_ms": 1.0},
        # Spark's compaction takes seconds, so the writers' commits surely land during it
        # (the Arrow engine's takes milliseconds here and commits the same way)
        "spark": {"engine": "spark"},
    })
    lake = Lake.from_settings(settings.lake)
    lake.ensure("bronze_events")  # version 0; every later version is one acknowledged write
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=2), today

    pipeline = IngestPipeline(settings, lake)
    pipeline.start()
    ingester = Ingester(pipeline)
    appender = Appender(lake.root, tmp_path / "appender.err")
    compactions: list[dict] = []
    try:
        assert appender.ready.wait(60) and appender.proc.poll() is None, "appender did not start"
        ingester.thread.start()
        for _ in range(compactions_under_load):
            before = lake.version("bronze_events")
            out = compact.run(settings, start=start, end=end, spark=spark)
            out["bronze_commits_during"] = lake.version("bronze_events") - before
            compactions.append(out)
    finally:
        ingester.stop.set()
        ingester.thread.join(timeout=60)
        err = appender.stop()
        pipeline.close()  # flushes what is still pending
    assert ingester.error is None, repr(ingester.error)
    assert appender.proc.returncode == 0 and appender.done, err[-2000:]
    # the writers really overlapped the compactions
    assert all(c["bronze_commits_during"] > 0 for c in compactions), compactions

    # -- bronze: every acknowledged event exactly once, nothing else --------------------
    acked = [ids for ids in ingester.acks] + [a["ids"] for a in appender.acks]
    expected = Counter(e for ids in acked for e in ids)
    assert max(expected.values()) == 1  # the writers never reuse an id
    bronze = Counter(lake.read("bronze_events", columns=["event_id"])
                     .column("event_id").to_pylist())
    assert bronze == expected, (
        f"missing {sorted(set(expected) - set(bronze))[:5]}, "
        f"extra {sorted(set(bronze) - set(expected))[:5]}, "
        f"twice {[e for e, n in bronze.items() if n > 1][:5]}")

    # -- the Delta log: contiguous versions, one commit per acknowledged write ----------
    log = commits(lake, "bronze_events")
    versions = sorted(log)
    assert versions == list(range(versions[-1] + 1)), "a Delta log version is missing"
    assert log[0] == []  # the create
    n_writes = pipeline.flush_commits + len(appender.acks)
    assert len(versions) == 1 + n_writes, (len(versions), pipeline.flush_commits,
                                           len(appender.acks))
    assert all(log[v] for v in versions[1:]), "a commit added no rows"
    version_of = {e: v for v, ids in log.items() for e in ids}
    for ids in acked:  # a batch is never split over commits
        assert len({version_of[e] for e in ids}) == 1, ids
    # Lake.append returns the version of its own commit, even with other writers racing
    for a in appender.acks:
        assert a["version"] == version_of[a["ids"][0]], a
    dt = lake.delta("bronze_events")
    assert dt.transaction_version(pipeline.app_id) == pipeline.stats()["committed_seq"] > 0

    # -- silver after a final compaction: every event once -------------------------------
    final = compact.run(settings, start=start, end=end, spark=spark)
    silver = Counter(lake.read("silver_events", columns=["event_id"])
                     .column("event_id").to_pylist())
    assert silver == expected
    assert final["bronze_rows"] == final["silver_rows"] == len(expected)
    print(f"\nconcurrent writers: {len(ingester.acks)} ingest batches -> "
          f"{pipeline.flush_commits} WAL flush commits, {len(appender.acks)} Lake.append "
          f"commits from a second process, {len(compactions)} compactions under load "
          f"(bronze commits during each: {[c['bronze_commits_during'] for c in compactions]}, "
          f"{[c['seconds'] for c in compactions]} s); {len(expected)} events, "
          f"{versions[-1]} bronze versions; {ingester.overloaded} ingest call(s) refused "
          f"by back-pressure and retried")

