"""`Admin.ModelInfo` carries the served model's evaluation as structured fields (value and
bootstrap interval per metric, the baselines, the test-set size), and the client's
`model-info` prints them: no JSON inside a string to parse."""

from __future__ import annotations

import json
from pathlib import Path

import online_bundles as kb
import pytest
from lambdarec_client.cli import main as cli_main

from lake.config import load_settings
from online.model_info import evaluation_fields
from online.server import create_server

TOKEN = "info-token"
# The shape `spark_jobs.evaluate` writes into metrics.json (and publish into the manifest).
EVALUATION = {
    "split": "user_time", "k": [10, 20], "n_test_users": 412, "min_test_users": 50,
    "models": {"als": {"ndcg@10": 0.31, "recall@20": 0.4},
               "popularity": {"ndcg@10": 0.12, "recall@20": 0.2}},
    "intervals": {"confidence": 0.95, "bootstrap": 500,
                  "models": {"als": {"ndcg@10": [0.29, 0.33]},
                             "popularity": {"ndcg@10": [0.11, 0.13]}},
                  "vs_popularity": {"ndcg@10": {"diff": 0.19, "ci": [0.17, 0.21]}}},
    "report": "/x/report.md",
}


def test_evaluation_fields_of_the_flat_and_the_full_shape() -> None:
    flat = evaluation_fields({"ndcg@10": 0.5, "note": "hand-made"})
    assert {k: m.value for k, m in flat["metrics"].items()} == {"ndcg@10": 0.5}
    assert evaluation_fields({}) == {} and evaluation_fields(None) == {}
    full = evaluation_fields(EVALUATION)
    ndcg = full["metrics"]["ndcg@10"]
    assert (ndcg.value, ndcg.interval_low, ndcg.interval_high) == (0.31, 0.29, 0.33)
    assert not full["metrics"]["recall@20"].HasField("interval_low")
    assert set(full["baselines"]) == {"popularity"}
    assert full["baselines"]["popularity"].metrics["ndcg@10"].interval_high == 0.13
    assert (full["interval_confidence"], full["n_test_users"]) == (0.95, 412)


def test_model_info_rpc_and_cli_print_metrics_with_intervals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")}, "model": {"dir": str(tmp_path / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": TOKEN, "wal_dir": str(tmp_path / "wal")}})
    kb.build(Path(settings.model.dir), "v1", metrics=EVALUATION)
    server, ports = create_server(settings)
    server.start()
    try:
        admin = f"127.0.0.1:{ports['admin']}"
        rc = cli_main(["--admin-target", admin, "--token", TOKEN, "model-info"], env={})
        out = json.loads(capsys.readouterr().out)
    finally:
        server.stop(grace=1)
    assert rc == 0
    assert out["metrics"] == {
        "ndcg@10": {"value": 0.31, "interval_low": 0.29, "interval_high": 0.33},
        "recall@20": {"value": 0.4}}
    assert out["baselines"]["popularity"]["metrics"]["ndcg@10"] == {
        "value": 0.12, "interval_low": 0.11, "interval_high": 0.13}
    assert (out["interval_confidence"], out["n_test_users"]) == (0.95, 412)
    assert "metrics_json" not in out  # deprecated: the structured fields say it all
    assert out["model_version"] == "v1"
