"""Shared fixtures: one local SparkSession for the whole run, a fresh lake per test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lake.config import SparkSettings
from lake.tables import Lake


@pytest.fixture(scope="session")
def spark() -> Iterator:
    """local[2], one shuffle partition, bound to 127.0.0.1 (built by lake.spark_session)."""
    from lake.spark_session import get_spark

    session = get_spark(
        SparkSettings(master="local[2]", app_name="lambdarec-tests", driver_memory="1g",
                      shuffle_partitions=1)
    )
    yield session
    session.stop()
    # py4j logs from __del__ at interpreter exit, after pytest closed the capture streams
    logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")
