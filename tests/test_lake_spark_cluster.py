"""get_spark + the bridge against a real standalone cluster (master + 1 worker on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_class(*args: str, log: Path) -> subprocess.Popen:
    import pyspark

    home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "SPARK_WORKER_DIR": str(log.parent / "work"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.Popen([str(home / "bin" / "spark-class"), *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("spark-cluster")
    port, ui, wui = _free_port(), _free_port(), _free_port()
    url = f"spark://127.0.0.1:{port}"
    procs = [_spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                          "--port", str(port), "--webui-port", str(ui), log=logs / "master.log")]
    try:
        procs.append(_spark_class("org.apache.spark.deploy.worker.Worker", "--host",
                                  "127.0.0.1", "--cores", "1", "--memory", "1g",
                                  "--webui-port", str(wui), url, log=logs / "worker.log"))
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                    if json.load(r).get("aliveworkers", 0) >= 1:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("standalone cluster did not come up:\n"
                            + (logs / "master.log").read_text()[-2000:])
            time.sleep(1)
        yield url
    finally:
        for p in reversed(procs):  # each in its own session: stop the whole group
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


JOB = textwrap.dedent("""
    import json, sys
    from datetime import UTC, datetime
    from pyspark.sql import functions as F
    from lake.config import SparkSettings
    from lake.spark_bridge import read_table, write_table
    from lake.spark_session import get_spark
    from lake.tables import Lake
    from lake.validation import events_to_table

    master, root = sys.argv[1], sys.argv[2]
    lake = Lake(root)
    lake.append("bronze_events", events_to_table([
        {"event_id": f"e{i}", "user_id": f"u{i % 2}", "item_id": "i1", "event_type": "view",
         "ts": datetime(2024, 1, 1 + i % 2, tzinfo=UTC)} for i in range(6)]))
    spark = get_spark(SparkSettings(master=master, driver_memory="1g", executor_memory="1g",
                                    shuffle_partitions=2))
    sc = spark.sparkContext
    # Python on the executors runs this interpreter (PYSPARK_PYTHON from get_spark)
    pythons = sc.parallelize(range(4), 2).map(lambda _: __import__("sys").executable)
    pythons = sorted(set(pythons.collect()))
    df = read_table(spark, lake, "bronze_events").withColumn("user_id", F.upper("user_id"))
    v = write_table(df, lake, "silver_events", mode="append")
    out = read_table(spark, lake, "silver_events").groupBy("event_date").count().collect()
    print(json.dumps({"master": sc.master, "version": v, "pythons": pythons,
                      "counts": sorted((str(r[0]), r[1]) for r in out),
                      "users": sorted(set(lake.read("silver_events").column("user_id")
                                          .to_pylist()))}))
    spark.stop()
""")


def test_bridge_on_standalone_cluster(cluster: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", JOB, cluster, str(tmp_path / "lake")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["master"] == cluster
    assert res["pythons"] == [sys.executable]
    assert res["version"] == 1
    assert res["counts"] == [["2024-01-01", 3], ["2024-01-02", 3]]
    assert res["users"] == ["U0", "U1"]
