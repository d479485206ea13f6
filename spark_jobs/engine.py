"""Which engine runs a batch step: Spark, or Arrow in the job's own process.

Compaction and gold are a dedupe and an aggregation. On one machine Spark's fixed costs
(a JVM that starts cold, ~5 s; query planning, code generation and task scheduling, a few
seconds a job) dwarf the work below a few million rows: compaction of MovieLens-1M (1M
events) takes ~20 s in Spark `local[*]` on 2 cores and ~2 s on Arrow tables. So each of
these jobs implements its rules twice, side by side in its own module (Spark columns and
Arrow compute), tested against the same known answers and against each other, and this
module picks one per run:

- `spark.engine: spark` or `arrow` forces it;
- `auto` (the default) picks Arrow when the master is local and the step's input, as the
  Delta log counts it, has at most `spark.arrow_max_rows` rows; Spark otherwise: a
  cluster master (or `spark-submit` against one) means the data may not fit one process.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from lake.config import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

Engine = Literal["spark", "arrow"]


def _master(settings: SparkSettings, spark: SparkSession | None) -> str:
    if spark is not None:
        return str(spark.sparkContext.master)
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # under spark-submit the submitter's --master wins (lake.spark_session), and its
        # JVM is already up: asking the session costs nothing
        from lake.spark_session import get_spark

        return str(get_spark(settings).sparkContext.master)
    return settings.master


def choose_engine(settings: SparkSettings, rows: int | None,
                  spark: SparkSession | None = None) -> Engine:
    """The engine for a step whose input has `rows` rows (None: unknown, so Spark)."""
    if settings.engine != "auto":
        return settings.engine
    if rows is None or rows > settings.arrow_max_rows:
        return "spark"
    return "arrow" if _master(settings, spark).startswith("local") else "spark"
