"""Access keys of the public service, the history scope, protected mode and the admin-token
guard: a real server on 127.0.0.1 (port 0) with a real keys file written by the keys CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from lambdarec_client import Client
from lambdarec_client.cli import main as cli_main
from test_online_server import TOKEN, Running, code_of, ev, ids, make_settings

from lake.config import ConfigError
from online.console.data import ConsoleData
from online.keys import KeyStore
from online.keys import main as keys_main
from online.pb import admin_pb2, admin_pb2_grpc
from online.server import create_server

ROOT = Path(__file__).resolve().parent.parent


def create_key(path: Path, name: str, scopes: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert keys_main(["--file", str(path), "create", "--name", name, "--scopes", scopes]) == 0
    return str(json.loads(capsys.readouterr().out)["key"])


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("auth")
    store = KeyStore(tmp / "lake" / "access_keys.json")  # the default: next to the tables
    keys = {name: store.create(name, scopes)[1] for name, scopes in (
        ("reader", ("recommend",)), ("writer", ("ingest",)), ("shop", ("catalogue",)),
        ("all", ("recommend", "ingest", "catalogue")), ("historian", ("recommend", "history")))}
    run = Running(tmp)
    yield run, keys
    run.close()


def client(run: Running, key: str | None) -> Client:
    return Client(run.target, run.admin_target, token=TOKEN, key=key, timeout=10)


def test_keys_cli_stores_only_hashes_and_rejects_bad_scopes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "shop1", "recommend,ingest", capsys)
    assert key.startswith("lrk_") and len(key) > 40
    text = path.read_text()
    assert key not in text and "shop1" in text  # the key is shown once, never stored
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert keys_main(["--file", str(path), "list"]) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert [(k["name"], k["scopes"]) for k in listed] == [("shop1", ["recommend", "ingest"])]
    assert "key" not in listed[0]

    assert keys_main(["--file", str(path), "create", "--name", "x", "--scopes", "read"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --scopes: unknown scope 'read' (known: recommend, ingest, "
                   "catalogue, history)")
    assert keys_main(["--file", str(path), "create", "--name", "shop1", "--scopes",
                      "ingest"]) == 2
    assert "a key named 'shop1' exists" in capsys.readouterr().err
    assert keys_main(["--file", str(path), "revoke", "shop1"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"]["name"] == "shop1"
    assert KeyStore(path).load() == []
    assert keys_main(["--file", str(path), "revoke", "shop1"]) == 2
    assert "no key named or with id 'shop1'" in capsys.readouterr().err


def test_calls_without_a_valid_key_are_unauthenticated(keyed) -> None:  # type: ignore[no-untyped-def]
    run, _ = keyed
    for key in (None, "lrk_not-a-key"):
        with client(run, key) as c:
            code, msg = code_of(lambda c=c: c.recommend("uA0", k=3, explain=True))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert msg == ("Recommend needs an access key: send 'authorization: Bearer <key>' "
                           "(keys: python -m online.keys create)" if key is None
                           else "invalid or revoked access key")
            code, _ = code_of(lambda c=c: c.ingest([ev("uX", "A1")]))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    # the admin token is not an access key, and health checks need no credentials
    with client(run, TOKEN) as c:
        assert code_of(lambda: c.similar("A1", k=2))[0] == grpc.StatusCode.UNAUTHENTICATED
    with client(run, None) as c:
        assert c.health() == "SERVING"


def test_each_method_needs_its_scope(keyed) -> None:  # type: ignore[no-untyped-def]
    run, keys = keyed
    with client(run, keys["writer"]) as c:
        # Recommend needs the recommend scope, with explain too (its reasons also need history)
        code, msg = code_of(lambda: c.recommend("uA0", k=3, explain=True))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert msg == ("access key 'writer' lacks the scope Recommend needs (recommend); "
                       "it has ingest")
        assert c.ingest([ev("uAuth", "B2", "purchase")]).accepted == 1
        code, msg = code_of(lambda: c.upsert_items([{"item_id": "A1", "title": "x"}]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "(catalogue)" in msg
    with client(run, keys["reader"]) as c:
        assert ids(c.recommend("uA0", k=3)) == ["A2", "A3", "A4"]
        assert ids(c.recommend("uAuth", k=2)) == ["B0", "B1"]  # the writer's event counts
        assert c.recommend_batch([{"user_id": "uB0", "k": 1}]).responses[0].items
        assert ids(c.similar("C0", k=1)) == ["C1"]
        assert code_of(lambda: c.ingest([ev("uA0", "A1")]))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
    with client(run, keys["shop"]) as c:
        assert c.upsert_items([{"item_id": "A9", "title": "shoe"}]).upserted == 1
        assert code_of(lambda: c.similar("C0", k=1))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_key_stops_working_within_a_second(
        keyed, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    run, _ = keyed
    path = run.settings.lake.root / "access_keys.json"
    key = create_key(path, "temp", "recommend", capsys)
    deadline = time.monotonic() + 3
    with client(run, key) as c:
        while True:  # a key created while the server runs is picked up as well
            try:
                c.recommend("uA0", k=1)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the new key was not picked up"
                time.sleep(0.1)
        assert keys_main(["--file", str(path), "revoke", "temp"]) == 0
        t0 = time.monotonic()
        while True:
            try:
                c.recommend("uA0", k=1)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - t0 < 3, "the revoked key still works"
            time.sleep(0.1)
    assert time.monotonic() - t0 < 1.5


def test_cli_sends_the_key_from_flag_or_environment(
        keyed, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    run, keys = keyed
    base = ["--target", run.target, "--admin-target", run.admin_target]
    assert cli_main([*base, "recommend", "uA0", "-k", "2"], env={}) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "UNAUTHENTICATED"
    assert cli_main([*base, "--key", keys["reader"], "recommend", "uA0", "-k", "2"],
                    env={}) == 0
    assert [i["item_id"] for i in json.loads(capsys.readouterr().out)["items"]] == ["A2", "A3"]
    assert cli_main([*base, "recommend", "uA0", "-k", "2"],
                    env={"LAMBDAREC_KEY": keys["reader"]}) == 0
    capsys.readouterr()


def test_console_calls_with_its_own_in_process_key(keyed) -> None:  # type: ignore[no-untyped-def]
    run, _ = keyed
    data = ConsoleData(run.server)
    try:
        reply = data.recommend("uA0", k=2)
        assert [i["item_id"] for i in reply["items"]] == ["A2", "A3"]
        # its key holds every scope, history included: the page shows the reasons
        assert all(i["because"] and {b["item_id"] for b in i["because"]} <= {"A0", "A1"}
                   for i in reply["items"])
    finally:
        data.close()


def because(resp) -> list[list[str]]:  # type: ignore[no-untyped-def]
    return [list(i.because) for i in resp.items]


def test_explain_reasons_need_the_history_scope(keyed) -> None:  # type: ignore[no-untyped-def]
    run, keys = keyed
    with client(run, keys["reader"]) as c:  # recommend only: the answer, not the history
        plain = c.recommend("uA0", k=3)
        resp = c.recommend("uA0", k=3, explain=True)
        assert ids(resp) == ids(plain) == ["A2", "A3", "A4"]
        assert because(resp) == [[], [], []]
        batch = c.recommend_batch([{"user_id": "uA0", "k": 2, "explain": True},
                                   {"user_id": "uB0", "k": 2, "explain": True}])
        assert [ids(r) for r in batch.responses] == [["A2", "A3"], ["B2", "B3"]]
        assert [because(r) for r in batch.responses] == [[[], []], [[], []]]
    with client(run, keys["historian"]) as c:  # uA0's history is A0, A1 (the bundle's)
        resp = c.recommend("uA0", k=3, explain=True)
        assert ids(resp) == ["A2", "A3", "A4"]
        assert all(b and set(b) <= {"A0", "A1"} for b in because(resp))
        batch = c.recommend_batch([{"user_id": "uB0", "k": 2, "explain": True}])
        assert all(b and set(b) <= {"B0", "B1"} for b in because(batch.responses[0]))
        assert because(c.recommend("uA0", k=3)) == [[], [], []]  # asked for none


def test_an_open_loopback_port_explains_without_a_key(tmp_path: Path) -> None:
    run = Running(tmp_path)  # no keys: open on loopback, so every call may read history
    try:
        resp = run.client.recommend("uA0", k=2, explain=True)
        assert all(b and set(b) <= {"A0", "A1"} for b in because(resp))
    finally:
        run.close()


def test_loopback_without_keys_runs_open_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        run = Running(tmp_path)
    try:
        assert ids(run.client.recommend("uA0", k=1)) == ["A2"]  # no key needed
    finally:
        run.close()
    lines = [r.getMessage() for r in caplog.records if "access key" in r.getMessage()]
    assert lines == ["no access keys yet: the public service accepts calls without a key "
                     "while it listens on loopback only; create keys with python -m "
                     "online.keys create"]
    assert not [r for r in caplog.records if "admin_token is the default" in r.getMessage()]


def test_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError) as ei:
        create_server(settings, load_model=False, metrics=False, threads=False)
    assert str(ei.value) == (
        f"server.host '0.0.0.0' is not loopback and server.keys_file "
        f"{tmp_path / 'lake' / 'access_keys.json'} holds no access key: create one "
        "(python -m online.keys create --name NAME --scopes recommend,ingest,catalogue) or "
        "set server.auth: none to serve without keys")
    assert not (tmp_path / "wal").exists()  # refused before anything was written
    # the documented opt-out starts (and says so)
    server, _ = create_server(make_settings(tmp_path, host="0.0.0.0", auth="none",
                                            admin_token=STRONG),
                              load_model=False, metrics=False, threads=False)
    server.start()
    server.stop(grace=0)


@pytest.mark.slow
def test_server_process_refusing_to_start_prints_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LAMBDAREC__SERVER__HOST": "0.0.0.0",
           "LAMBDAREC__SERVER__PORT": "0", "LAMBDAREC__SERVER__ADMIN_PORT": "0",
           "LAMBDAREC__SERVER__METRICS_PORT": "0",
           "LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
           "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
           "LAMBDAREC__SERVER__WAL_DIR": str(tmp_path / "wal")}
    out = subprocess.run([sys.executable, "-m", "online.server"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: server.host '0.0.0.0' is not "
                                                   "loopback"), out.stderr


STRONG = "0123456789abcdef0123456789abcdef"  # like `openssl rand -hex 16`


@pytest.mark.parametrize("token, problem", [
    ("change-me", "is the default 'change-me'"),
    ("", "is empty"),
    ("fifteen-chars-x", "has 15 characters, fewer than 16"),
])
def test_non_loopback_with_a_weak_admin_token_refuses_to_start(
        tmp_path: Path, token: str, problem: str) -> None:
    for host in ("0.0.0.0", "192.0.2.1"):  # the second: never bound, refused before
        settings = make_settings(tmp_path, host=host, auth="none", admin_token=token)
        with pytest.raises(ConfigError) as ei:
            create_server(settings, load_model=False, metrics=False, threads=False)
        assert str(ei.value) == (
            f"server.host {host!r} is not loopback and server.admin_token {problem}: set "
            "LAMBDAREC__SERVER__ADMIN_TOKEN to a secret of at least 16 characters (e.g. "
            "openssl rand -hex 16)")
    assert not (tmp_path / "wal").exists()  # refused before anything was written
    server, _ = create_server(make_settings(tmp_path, host="0.0.0.0", auth="none",
                                            admin_token=token + "-" + STRONG),
                              load_model=False, metrics=False, threads=False)
    server.start()
    server.stop(grace=0)


@pytest.mark.slow
def test_server_process_with_the_shipped_admin_token_off_loopback_prints_one_line(
        tmp_path: Path) -> None:
    KeyStore(tmp_path / "lake" / "access_keys.json").create("shop", ("recommend",))  # keys on
    env = {**os.environ, "LAMBDAREC__SERVER__HOST": "0.0.0.0",
           "LAMBDAREC__SERVER__ADMIN_TOKEN": "change-me",
           "LAMBDAREC__SERVER__PORT": "0", "LAMBDAREC__SERVER__ADMIN_PORT": "0",
           "LAMBDAREC__SERVER__METRICS_PORT": "0",
           "LAMBDAREC__LAKE__ROOT": str(tmp_path / "lake"),
           "LAMBDAREC__MODEL__DIR": str(tmp_path / "models"),
           "LAMBDAREC__SERVER__WAL_DIR": str(tmp_path / "wal")}
    out = subprocess.run([sys.executable, "-m", "online.server"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: server.host '0.0.0.0' is not loopback and server.admin_token is the default "
        "'change-me': set LAMBDAREC__SERVER__ADMIN_TOKEN to a secret of at least 16 "
        "characters (e.g. openssl rand -hex 16)"], out.stderr


def test_an_empty_admin_token_admits_no_one(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        run = Running(tmp_path, admin_token="")  # allowed on loopback only, with a warning
    try:
        assert "server.admin_token is empty: the admin port and the console admit no one; " \
               "set LAMBDAREC__SERVER__ADMIN_TOKEN" in [r.getMessage() for r in caplog.records]
        with grpc.insecure_channel(run.admin_target) as ch:
            info = admin_pb2_grpc.AdminStub(ch).ModelInfo
            for header in ("Bearer ", "Basic x"):  # both an empty credential
                with pytest.raises(grpc.RpcError) as ei:
                    info(admin_pb2.ModelInfoRequest(), metadata=[("authorization", header)],
                         timeout=5)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, header
    finally:
        run.close()


def test_default_admin_token_warns_once_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        server, _ = create_server(make_settings(tmp_path, admin_token="change-me"),
                                  load_model=False, metrics=False, threads=False)
    server.start()
    server.stop(grace=0)
    lines = [r for r in caplog.records if "admin_token" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in lines] == [(
        "WARNING", "server.admin_token is the default 'change-me': anyone who reaches the "
                   "admin port can reload models and erase users; set "
                   "LAMBDAREC__SERVER__ADMIN_TOKEN")]
