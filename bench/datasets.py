"""The batch pipeline run once per dataset per bench process, shared by the training and
accuracy sections (a tmp lake + models dir under var/bench/, removed at exit)."""

from __future__ import annotations

import atexit
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.fixtures import scratch_dir

_RUNS: dict[str, dict[str, Any]] = {}
SYNTHETIC_10M = {"synthetic_events": 10_000_000, "synthetic_users": 200_000,
                 "synthetic_items": 20_000}


def data_available(data: str) -> bool:
    from lake.config import load_settings

    if data.startswith("synthetic"):
        return True
    d = Path(load_settings(env={}).data.dir) / data
    return d.is_dir()


def pipeline_for(data: str) -> dict[str, Any]:
    """`spark_jobs.pipeline.run` on `data` (ml-100k | ml-1m | synthetic-10m) in a tmp lake;
    returns {"summary", "settings", "seconds"}. Cached for the process."""
    if data in _RUNS:
        return _RUNS[data]
    from lake.config import load_settings
    from spark_jobs import pipeline

    root = scratch_dir(f"pipeline-{data}-")
    atexit.register(shutil.rmtree, root, True)
    over: dict[str, Any] = {"lake": {"root": str(root / "lake")},
                            "model": {"dir": str(root / "models")},
                            "spark": {"master": "local[2]", "shuffle_partitions": 4}}
    source = data
    if data == "synthetic-10m":
        source = "synthetic"
        over["data"] = dict(SYNTHETIC_10M)
    settings = load_settings(env={}, overrides=over)
    settings = pipeline.dataset_settings(settings, source)
    print(f"[bench] batch pipeline on {data} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summary = pipeline.run(settings, data=source, force=True)
    out = {"summary": summary, "settings": settings, "seconds": time.perf_counter() - t0}
    _RUNS[data] = out
    return out
