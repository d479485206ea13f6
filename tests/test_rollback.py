"""Rollback from the contract (`lake.rollback`): the console's rollback action on a real
server, and the command line. The model_runs transitions are tested with publish
(tests/test_publish.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import online_bundles as kb
import pytest

from lake.bundle import current_version
from lake.config import load_settings
from lake.rollback import RollbackError
from online.console.data import ConsoleData
from online.server import create_server

ROOT = Path(__file__).resolve().parent.parent


def test_the_consoles_rollback_moves_current_and_the_server_serves_it(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp_path / "lake")},
        "model": {"dir": str(tmp_path / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": "rollback-test-token", "wal_dir": str(tmp_path / "wal")},
    })
    models = Path(settings.model.dir)
    kb.build(models, "v1")
    kb.build(models, "v2")  # CURRENT -> v2
    server, _ = create_server(settings, metrics=False)
    server.start()
    data = ConsoleData(server)
    try:
        assert server.manager.current.version == "v2"
        assert data.rollback("v1") == "CURRENT is v1; this server serves v1"
        assert current_version(models) == "v1"
        assert server.manager.current.version == "v1"
        with pytest.raises(RollbackError, match="unknown model version 'v9'"):
            data.rollback("v9")
        assert current_version(models) == "v1"
    finally:
        data.close()
        server.stop(grace=1)


def test_the_command_prints_one_json_line_or_one_error_line(tmp_path: Path) -> None:
    env = {"LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
           "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"}
    kb.build(tmp_path / "models", "v1")
    kb.build(tmp_path / "models", "v2")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lake.rollback", *args], cwd=ROOT,
                              env=env, text=True, capture_output=True, timeout=120)

    bad = run("--version", "nope")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("lake.rollback: error: unknown model version 'nope'")
    assert bad.stderr.count("\n") == 1
    ok = run("--version", "v1")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert (out["job"], out["version"], out["previous_current"], out["current"]) == (
        "rollback", "v1", "v2", "v1")
    assert current_version(tmp_path / "models") == "v1"
