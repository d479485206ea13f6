"""The one place SparkSessions are built.

Every Spark job, the tests and the bridge get their session from `get_spark(settings)`,
so time zone, timestamp encoding and networking are the same everywhere:

- `spark.sql.session.timeZone=UTC`: dates derived from timestamps are UTC dates, as in
  the lake's partition columns.
- `spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS`: Spark-written Parquet carries
  microsecond timestamps (not INT96), which is what Delta readers expect.
- The driver binds to 127.0.0.1 and the UI is off: nothing listens on public interfaces.

Works for `local[N]` / `local[*]` and for a standalone master such as
`spark://127.0.0.1:7077`; executors are told to use this interpreter (`PYSPARK_PYTHON`).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from lake.config import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOG_LEVEL = "ERROR"
LOOPBACK = "127.0.0.1"


def spark_conf(settings: SparkSettings) -> dict[str, str]:
    """The session's configuration as a plain dict (`settings.conf` wins over our defaults)."""
    conf = {
        "spark.driver.memory": settings.driver_memory,
        "spark.executor.memory": settings.executor_memory,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.parquet.datetimeRebaseModeInWrite": "CORRECTED",
        "spark.sql.parquet.int96RebaseModeInWrite": "CORRECTED",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.default.parallelism": str(settings.shuffle_partitions),
        "spark.driver.host": LOOPBACK,
        "spark.driver.bindAddress": LOOPBACK,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # read_table passes explicit file lists: listing them with a distributed job (the
        # default above 32 paths) costs ~14 s for 900 files vs ~1 s on the driver.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
        # Executors (standalone workers) must run the same interpreter as the driver.
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
    }
    conf.update({str(k): str(v) for k, v in settings.conf.items()})
    return conf


def get_spark(settings: SparkSettings | None = None) -> SparkSession:
    """Build (or return the already running) SparkSession for `settings`.

    Args:
        settings: Spark section of the config; defaults when None.

    Returns:
        The session, log level set to ERROR. Spark allows one active session per
        process: a second call returns the running one (static settings such as the
        master or driver memory of the first call stay in force).
    """
    from pyspark.sql import SparkSession

    settings = settings or SparkSettings()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    builder = SparkSession.builder.appName(settings.app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Under spark-submit (which sets the gateway port) the submitter's --master wins,
        # so the Airflow connection decides where a DAG's job runs.
        builder = builder.master(settings.master)
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(LOG_LEVEL)
    return spark


def active_session() -> SparkSession | None:
    """The session running in this process, if any (starts none)."""
    if "pyspark.sql" not in sys.modules:
        return None
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()
