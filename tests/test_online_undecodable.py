"""Bytes that are not a valid request message: INVALID_ARGUMENT on every method of both
ports (before the admin token check), one warning per interval, never INTERNAL."""

from __future__ import annotations

import logging
import random
from collections import Counter

import grpc
import online_bundles as kb
import pytest

from lake.config import load_settings
from online.server import create_server

TOKEN = "s3cret-token"
HOSTILE = [
    b"\x0a\x05ab",  # field 1 claims 5 bytes, 2 follow
    b"\x08",  # a varint cut short
    b"\xff" * 11,  # a tag varint that never ends
]
BAD_UTF8 = b"\x0a\x02\xc3\x28"  # string field 1 (user_id) holding invalid UTF-8
PUBLIC = ["/lambdarec.v1.Recommender/Recommend", "/lambdarec.v1.Recommender/RecommendBatch",
          "/lambdarec.v1.Recommender/SimilarItems", "/lambdarec.v1.Recommender/IngestEvents",
          "/lambdarec.v1.Recommender/UpsertItems", "/grpc.health.v1.Health/Check"]
ADMIN = ["/lambdarec.v1.Admin/ReloadModel", "/lambdarec.v1.Admin/ModelInfo",
         "/lambdarec.v1.Admin/ForgetUser", "/grpc.health.v1.Health/Check"]
STREAMING = [("unary_stream", "/grpc.health.v1.Health/Watch"),
             ("stream_stream", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")]


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("undecodable")
    kb.build(tmp / "models", "v1")
    settings = load_settings(env={}, overrides={
        "lake": {"root": str(tmp / "lake")}, "model": {"dir": str(tmp / "models")},
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "metrics_port": 0,
                   "admin_token": TOKEN, "wal_dir": str(tmp / "wal")}})
    server, bound = create_server(settings, metrics=False)
    server.start()
    yield bound
    server.stop(grace=1)


def call(channel: grpc.Channel, kind: str, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        if kind == "unary_unary":
            channel.unary_unary(method)(payload, timeout=10)
        elif kind == "unary_stream":
            list(channel.unary_stream(method)(payload, timeout=10))
        else:
            list(channel.stream_stream(method)(iter([payload]), timeout=10))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_undecodable_bytes_are_invalid_argument_everywhere(
        ports: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for port, methods in ((ports["grpc"], PUBLIC), (ports["admin"], ADMIN)):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for method in methods:
                for payload in HOSTILE:
                    assert call(ch, "unary_unary", method, payload) == \
                        grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
            method = PUBLIC[0] if port == ports["grpc"] else "/lambdarec.v1.Admin/ForgetUser"
            assert call(ch, "unary_unary", method, BAD_UTF8) == grpc.StatusCode.INVALID_ARGUMENT
            for kind, method in STREAMING:
                assert call(ch, kind, method, HOSTILE[0]) == \
                    grpc.StatusCode.INVALID_ARGUMENT, method
    # one line for the whole storm, not a traceback per call
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "undecodable" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


def test_a_valid_request_still_needs_the_token(ports: dict[str, int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{ports['admin']}") as ch:
        assert call(ch, "unary_unary", "/lambdarec.v1.Admin/ModelInfo", b"") == \
            grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.reliability
def test_hostile_bytes_storm_gets_no_internal(ports: dict[str, int]) -> None:
    rnd = random.Random(10)
    codes: Counter[str] = Counter()
    targets = [(ports["grpc"], m) for m in PUBLIC] + [(ports["admin"], m) for m in ADMIN]
    chans = {p: grpc.insecure_channel(f"127.0.0.1:{p}") for p in (ports["grpc"],
                                                                  ports["admin"])}
    try:
        for i in range(3000):
            port, method = rnd.choice(targets)
            n = rnd.randint(0, 64)
            payload = bytes(rnd.getrandbits(8) for _ in range(n)) if i % 3 else \
                rnd.choice(HOSTILE) + bytes(rnd.getrandbits(8) for _ in range(n))
            codes[call(chans[port], "unary_unary", method, payload).name] += 1
    finally:
        for ch in chans.values():
            ch.close()
    print(dict(codes))
    assert codes["INTERNAL"] == 0 and codes["UNKNOWN"] == 0, codes
    assert codes["INVALID_ARGUMENT"] > 1000
