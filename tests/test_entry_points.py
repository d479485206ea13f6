"""Entry points fail with one clear line and a non-zero exit, and answer --help."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _lake_env(tmp_path: Path) -> dict[str, str]:
    return {"LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
            "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
            "LAMBDAREC__SERVER__WAL_DIR": str(tmp_path / "wal"),
            "LAMBDAREC__DATA__SOURCE": "none"}


@pytest.mark.parametrize("module", ["online.server", "online.run"])
def test_help_prints_usage_and_starts_nothing(module: str) -> None:
    out = _run(module, "--help", timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith(f"usage: python -m {module}")


@pytest.mark.parametrize("module", ["online.server", "online.run"])
def test_busy_port_is_one_line_naming_the_setting(module: str, busy_port: int,
                                                  tmp_path: Path) -> None:
    env = {**_lake_env(tmp_path), "LAMBDAREC__SERVER__PORT": str(busy_port)}
    out = _run(module, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: 127.0.0.1:{busy_port} (server.port) is already in use")
    assert out.stderr.rstrip("\n").endswith("choose another port with LAMBDAREC__SERVER__PORT")
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "wal").exists()  # nothing was written


@pytest.mark.parametrize("module", ["online.server", "online.run"])
def test_unknown_config_key_is_one_line_with_a_suggestion(module: str, tmp_path: Path) -> None:
    out = _run(module, env={**_lake_env(tmp_path), "LAMBDAREC__SERVER__WORKRES": "2"})
    assert out.returncode == 2
    assert out.stderr == ("error: environment variable LAMBDAREC__SERVER__WORKRES: unknown key "
                          "server.workres; did you mean server.workers?\n")


def test_data_source_none_starts_on_an_empty_lake(tmp_path: Path) -> None:
    from lake.config import load_settings
    from lake.load import ensure_sample_data

    settings = load_settings(env={}, overrides={"lake": {"root": str(tmp_path / "lake")},
                                                "data": {"source": "none"}})
    out = ensure_sample_data(settings)
    assert (out["loaded"], out["events"], out["source"]) == (False, 0, "none")
    assert not (tmp_path / "lake" / "bronze_events").exists()


def test_printed_commands_use_this_python_and_ids_from_the_lake(tmp_path: Path) -> None:
    import pyarrow as pa

    from lake.config import load_settings
    from lake.reload_notice import python_command
    from lake.tables import Lake
    from online.run import NEW_USER, example_ids, usage

    lake = Lake(tmp_path / "lake")
    assert example_ids(lake) == (NEW_USER, "sku-1", "sku-1")
    ts = datetime(2026, 12, 1, tzinfo=UTC)
    rows = [("u1", "i1"), ("u2", "i1"), ("u2", "i2"), ("u2", "i3"), ("u3", "i4")]
    lake.append("bronze_events", pa.Table.from_pylist([
        {"event_id": f"e{n}", "user_id": u, "item_id": i, "event_type": "view", "ts": ts,
         "received_at": ts} for n, (u, i) in enumerate(rows)]))
    # the most active user; an item they have not touched; the most popular item
    assert example_ids(lake) == ("u2", "i4", "i1")
    text = usage(load_settings(env={}), {"grpc": 1, "admin": 2, "metrics": 3, "console": 4},
                 ("u2", "i4", "i1"))
    assert "\nconsole: http://127.0.0.1:4/\n" in text
    assert f"  {python_command()} -m lambdarec_client --target 127.0.0.1:1 " in text
    assert python_command() == ".venv/bin/python"  # tests run from the repo's venv
    assert "recommend u2 -k 10 --explain" in text and "similar i1 -k 5" in text


def test_pipeline_reloads_the_running_server_or_prints_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import online_bundles as kb

    from lake.config import load_settings
    from lake.reload_notice import reload_command
    from online.server import create_server
    from spark_jobs.pipeline import reload_servers

    overrides = {"lake": {"root": str(tmp_path / "lake")},
                 "model": {"dir": str(tmp_path / "models")},
                 "server": {"port": 0, "admin_port": 0, "metrics_port": 0,
                            "wal_dir": str(tmp_path / "wal")}}
    settings = load_settings(env={}, overrides=overrides)
    kb.build(Path(settings.model.dir), "v1")
    server, ports = create_server(settings, metrics=False)
    server.start()
    try:
        kb.build(Path(settings.model.dir), "v2")  # what publish does: bundle + CURRENT
        # reload_targets defaults to this configuration's own admin port
        live = load_settings(env={}, overrides={
            **overrides, "server": {**overrides["server"], "admin_port": ports["admin"]}})
        target = f"127.0.0.1:{ports['admin']}"
        assert live.airflow.reload_targets == [target]
        assert reload_servers(live, "v2")[target].startswith("ok")
        assert server.manager.current.version == "v2"  # was: kept serving v1
        assert f"[pipeline] reload: {target} now serves v2" in capsys.readouterr().err
    finally:
        server.stop(grace=1)
    dead = load_settings(env={}, overrides={**overrides, "airflow": {
        "reload_targets": ["127.0.0.1:1"]}})
    assert reload_servers(dead, "v2")["127.0.0.1:1"].startswith("unreachable")
    err = capsys.readouterr().err
    assert "no server answered on 127.0.0.1:1" in err
    assert err.rstrip().endswith(reload_command("127.0.0.1:1", "v2"))


def test_server_logging_leaves_out_faiss_loader_lines() -> None:
    """faiss logs each instruction set it probes at INFO (8 lines on every start): the
    server's logging keeps its own INFO lines and drops those."""
    code = ("import logging; from online.metrics import configure_logging; "
            "configure_logging(); import faiss; logging.getLogger('online').info('marker')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                         capture_output=True, timeout=120, check=True)
    lines = out.stderr.splitlines()
    assert any('"marker"' in ln for ln in lines), out.stderr
    assert not [ln for ln in lines if "faiss" in ln.lower()], out.stderr
