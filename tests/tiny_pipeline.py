"""Environment for a small end-to-end retrain run in a temporary lake (Airflow tests)."""

from __future__ import annotations

from pathlib import Path


def tiny_pipeline_env(tmp_path: Path) -> dict[str, str]:
    """LAMBDAREC__* overrides: tmp lake/models/WAL, 20k synthetic events, small Spark."""
    return {
        "LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
        "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
        "LAMBDAREC__SERVER__WAL_DIR": str(tmp_path / "wal"),
        "LAMBDAREC__DATA__SOURCE": "synthetic",
        "LAMBDAREC__DATA__SYNTHETIC_EVENTS": "20000",
        "LAMBDAREC__DATA__SYNTHETIC_USERS": "800",
        "LAMBDAREC__DATA__SYNTHETIC_ITEMS": "300",
        "LAMBDAREC__SPARK__DRIVER_MEMORY": "1g",
        "LAMBDAREC__SPARK__SHUFFLE_PARTITIONS": "2",
        "LAMBDAREC__TUNE__MAX_TRIALS": "4",  # a short search: the test checks the wiring
        "LAMBDAREC__AIRFLOW__RELOAD_TARGETS": '["127.0.0.1:1"]',  # nobody listens: a warning
        "OPENBLAS_NUM_THREADS": "1",
    }
