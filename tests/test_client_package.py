"""The light client package: builds on its own, needs only grpcio + protobuf, clear CLI errors."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from lambdarec_client.cli import main as cli_main

CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "python"


def test_importing_the_client_loads_no_server_package() -> None:
    code = ("import sys, lambdarec_client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'lake', 'online', 'spark_jobs', 'dags', 'pyspark', 'airflow', 'numpy', 'faiss'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_wheel_holds_client_and_stubs_and_requires_only_grpc_and_protobuf(
        tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(CLIENT_DIR)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lambdarec_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    requires = sorted(re.match(r"Requires-Dist: *([A-Za-z0-9_.-]+)", line).group(1)  # type: ignore[union-attr]
                      for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["grpcio", "grpcio-health-checking", "protobuf"]
    assert {"lambdarec/v1/recommender_pb2.py", "lambdarec/v1/admin_pb2_grpc.py",
            "lambdarec_client/client.py", "lambdarec_client/cli.py"} <= names
    assert not [n for n in names if n.split("/")[0] in {"online", "lake", "spark_jobs"}]


def test_cli_bad_jsonl_line_is_one_line_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"user_id": "u1", "item_id": "i1"}\n\n{"user_id": "u2", item_id}\n')
    # No server listens there: the file is read (and refused) before any call is made.
    rc = cli_main(["--target", "127.0.0.1:9", "ingest", "--file", str(events)], env={})
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {events}:3: not valid JSON")
    events.write_text("[1, 2]\n")
    assert cli_main(["--target", "127.0.0.1:9", "recommend-batch", "--file", str(events)],
                    env={}) == 2
    assert capsys.readouterr().err == f"error: {events}:1: expected a JSON object, got list\n"


def test_cli_targets_follow_the_servers_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from lambdarec_client.cli import default_targets

    assert default_targets({}) == ("127.0.0.1:50051", "127.0.0.1:50052", "change-me")
    env = {"LAMBDAREC__SERVER__HOST": "10.0.0.5", "LAMBDAREC__SERVER__PORT": "6001",
           "LAMBDAREC__SERVER__ADMIN_PORT": "6002", "LAMBDAREC__SERVER__ADMIN_TOKEN": "s3"}
    assert default_targets(env) == ("10.0.0.5:6001", "10.0.0.5:6002", "s3")


def test_cli_health_exits_0_only_when_serving(capsys: pytest.CaptureFixture[str]) -> None:
    """Container health checks (infra/docker-compose.yml) run `lambdarec_client health`:
    a server shutting down (NOT_SERVING) must fail the check, not just print it."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        args = ["--target", f"127.0.0.1:{port}", "--timeout", "5", "health", "--service", "svc"]
        servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
        assert cli_main(args, env={}) == 0
        servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert cli_main(args, env={}) == 1
        assert '"status": "NOT_SERVING"' in capsys.readouterr().out
    finally:
        server.stop(0)


def _protogen_copy(tmp_path: Path) -> types.ModuleType:
    """`protogen.py` and the protos copied to a scratch tree, so generating there leaves
    the checkout's package alone (it finds the protos relative to its own file)."""
    root = tmp_path / "repo"
    shutil.copytree(CLIENT_DIR.parent.parent / "protos", root / "protos")
    (root / "clients" / "python").mkdir(parents=True)
    shutil.copy(CLIENT_DIR / "protogen.py", root / "clients" / "python" / "protogen.py")
    spec = importlib.util.spec_from_file_location(f"protogen_{tmp_path.name}",
                                                  root / "clients" / "python" / "protogen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_never_leaves_the_package_missing(tmp_path: Path) -> None:
    """Every file-system step of a regeneration (Python's audit events fire before each
    rename, removal, mkdir, open) finds the package's modules in place: an importer never
    sees it missing, whether the package was a plain directory or an earlier generation."""
    gen = _protogen_copy(tmp_path)
    module = gen.OUT_DIR / "v1" / "recommender_pb2.py"
    gen.OUT_DIR.mkdir()  # a plain directory (an unpacked sdist, the layout before symlinks)
    gen.generate()
    missing: list[tuple[str, tuple]] = []
    watching = True

    def watch(event: str, args: tuple) -> None:
        if watching and event.startswith(("os.", "shutil.", "open")) \
                and not module.is_file():
            missing.append((event, args))

    sys.addaudithook(watch)  # cannot be removed: `watching` turns it off
    try:
        gen.generate()
        gen.generate()
    finally:
        watching = False
    assert missing == []
    assert module.is_file() and gen.OUT_DIR.is_symlink()
    # Generations kept: the current one and the one it replaced.
    kept = [d for d in gen.HERE.glob(".generated.*") if d.is_dir() and not d.is_symlink()]
    assert len(kept) == 2 and gen.OUT_DIR.resolve().parent in kept


def test_is_stale_checks_every_generated_file(tmp_path: Path) -> None:
    gen = _protogen_copy(tmp_path)
    assert gen.is_stale()  # nothing generated yet
    gen.generate()
    assert not gen.is_stale()
    v1 = gen.OUT_DIR / "v1"
    assert sorted(p.name for p in v1.iterdir()) == [
        "__init__.py", "admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py", "py.typed",
        "recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py"]
    proto = gen.PROTO_DIR / "lambdarec" / "v1" / "recommender.proto"
    for name in ("recommender_pb2.pyi", "admin_pb2.py", "__init__.py"):
        (v1 / name).unlink()
        assert gen.is_stale(), f"{name} missing"
        gen.generate()
        assert not gen.is_stale()
        # an output older than a proto (the proto was edited since)
        os.utime(v1 / name, (proto.stat().st_mtime - 10, proto.stat().st_mtime - 10))
        assert gen.is_stale(), f"{name} older than {proto.name}"
        gen.generate()
