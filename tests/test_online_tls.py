"""TLS on both gRPC ports and the web console with certificates generated at test time (the
`cryptography` package): a real server on 127.0.0.1, real handshakes, plaintext refused."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lambdarec_client import Client
from lambdarec_client.cli import main as cli_main
from test_console import assert_login_form_only, cookie_of, get, login
from test_online_server import TOKEN, Running, code_of, ids, make_settings

from lake.config import ConfigError
from lake.reload_notice import notify_reload
from lake.tls import own_client_tls
from online.console.app import create_console
from online.console.data import ConsoleData
from online.server import create_server
from online.tls import console_ssl_context


def issue(directory: Path, name: str, *, signer: tuple[Any, Any] | None = None,
          ca: bool = False) -> tuple[Path, Path, Any, Any]:
    """A certificate for 127.0.0.1 / localhost, self-signed or signed by `signer`
    (cert, key); written as `<name>.pem` and `<name>.key`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = signer if signer is not None else (None, key)
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(issuer_key, hashes.SHA256()))
    pem, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pem, key_file, cert, key


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, _, _ = issue(tmp, "server", ca=True)  # self-signed, like `openssl req -x509`
    run = Running(tmp, tls_cert=str(cert), tls_key=str(key), console_port=0)
    yield run, cert
    run.close()


def test_tls_call_works_and_plaintext_fails(tls) -> None:  # type: ignore[no-untyped-def]
    run, cert = tls
    with Client(run.target, run.admin_target, token=TOKEN, root_cert=cert, timeout=10) as c:
        assert ids(c.recommend("uA0", k=2)) == ["A2", "A3"]
        assert c.model_info().model_version == "v1"  # the admin port speaks TLS too
        assert c.health() == "SERVING"
    with Client(run.target, run.admin_target, token=TOKEN, timeout=3) as plain:
        for call in (lambda: plain.recommend("uA0", k=2), plain.model_info):
            assert code_of(call)[0] == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_certificate_is_refused(
        tls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _ = tls
    other, _, _, _ = issue(tmp_path, "impostor", ca=True)
    with Client(run.target, token=TOKEN, root_cert=other, timeout=3) as c:
        assert code_of(lambda: c.recommend("uA0", k=2))[0] == grpc.StatusCode.UNAVAILABLE


def test_console_reaches_a_tls_server(tls) -> None:  # type: ignore[no-untyped-def]
    run, _ = tls
    data = ConsoleData(run.server)
    try:
        assert [i["item_id"] for i in data.recommend("uA0", k=2)["items"]] == ["A2", "A3"]
    finally:
        data.close()


def test_mutual_tls_needs_a_client_certificate(tmp_path: Path) -> None:
    server_cert, server_key, _, _ = issue(tmp_path, "server", ca=True)
    client_ca, _, ca_cert, ca_key = issue(tmp_path, "client-ca", ca=True)
    shop_cert, shop_key, _, _ = issue(tmp_path, "shop", signer=(ca_cert, ca_key))
    # the console presents the server's own certificate: trust it too
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(client_ca.read_bytes() + server_cert.read_bytes())
    run = Running(tmp_path, tls_cert=str(server_cert), tls_key=str(server_key),
                  tls_client_ca=str(bundle))
    try:
        with Client(run.target, root_cert=server_cert, timeout=3) as anonymous:
            assert code_of(lambda: anonymous.recommend("uA0", k=1))[0] == \
                grpc.StatusCode.UNAVAILABLE
        with Client(run.target, root_cert=server_cert, cert_chain=shop_cert,
                    private_key=shop_key, timeout=10) as shop:
            assert ids(shop.recommend("uA0", k=1)) == ["A2"]
        data = ConsoleData(run.server)
        try:
            assert [i["item_id"] for i in data.recommend("uA0", k=1)["items"]] == ["A2"]
        finally:
            data.close()
    finally:
        run.close()


@pytest.mark.parametrize("server, message", [
    ({"tls_cert": "cert.pem"}, "server.tls_cert and server.tls_key: set both (TLS) or neither"),
    ({"tls_client_ca": "ca.pem"},
     "server.tls_client_ca: needs server.tls_cert and server.tls_key"),
    ({"tls_cert": "missing.pem", "tls_key": "missing.key"}, "server.tls_cert: cannot read "),
    ({"tls_cert": "notpem.txt", "tls_key": "notpem.txt"}, "server.tls_cert: "),
])
def test_bad_tls_settings_name_the_key(tmp_path: Path, server: dict[str, str],
                                       message: str) -> None:
    (tmp_path / "notpem.txt").write_text("hello")
    settings = make_settings(tmp_path, **{k: str(tmp_path / v) for k, v in server.items()})
    with pytest.raises(ConfigError) as ei:
        create_server(settings, load_model=False, metrics=False, threads=False)
    assert str(ei.value).startswith(message)
    if "notpem" in str(server):
        assert str(ei.value).endswith("notpem.txt is not a PEM file")


def test_cli_speaks_tls_from_flag_or_environment(
        tls, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    run, cert = tls
    base = ["--target", run.target, "--admin-target", run.admin_target, "--timeout", "5"]
    assert cli_main([*base, "--tls-ca", str(cert), "recommend", "uA0", "-k", "1"], env={}) == 0
    assert [i["item_id"] for i in json.loads(capsys.readouterr().out)["items"]] == ["A2"]
    assert cli_main([*base, "recommend", "uA0", "-k", "1"],
                    env={"LAMBDAREC_TLS_CA": str(cert)}) == 0
    capsys.readouterr()
    assert cli_main([*base, "--tls-ca", "/nonexistent.pem", "recommend", "uA0"], env={}) == 2
    assert capsys.readouterr().err == ("error: --tls-ca (LAMBDAREC_TLS_CA): cannot read "
                                       "/nonexistent.pem: No such file or directory\n")


def test_reload_notification_reaches_a_tls_admin_port(tls) -> None:  # type: ignore[no-untyped-def]
    run, _ = tls
    out = notify_reload([run.admin_target], TOKEN, None,
                        tls=own_client_tls(run.settings.server))["targets"]
    assert out[run.admin_target].startswith("ok: "), out
    plain = notify_reload([run.admin_target], TOKEN, None, timeout_s=3)["targets"]
    assert plain[run.admin_target].startswith("unreachable: UNAVAILABLE"), plain


def test_console_speaks_https_with_the_servers_certificate(
        tls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, cert = tls
    con = create_console(run.settings, run.server)
    con.start()
    try:
        assert con.scheme == "https"
        base = f"https://127.0.0.1:{con.port}"
        trust = ssl.create_default_context(cafile=str(cert))  # verifies name and chain
        assert_login_form_only(*get(base + "/users/uA0", context=trust), expected=401,
                               where="https, signed out")
        status, headers, _ = login(base, next_path="/users/uA0", context=trust)
        assert status == 303
        attrs = [a.strip() for a in headers["Set-Cookie"].split(";")]
        assert {"Secure", "HttpOnly", "SameSite=Strict"} <= set(attrs)  # HTTPS-only cookie
        status, _, body = get(base + "/users/uA0", cookie=cookie_of(headers), context=trust)
        assert status == 200 and b'id="recommendations"' in body and b"A2" in body
        # a silent client (no handshake) holds its own thread, not the accept loop
        with socket.create_connection(("127.0.0.1", con.port)):
            t0 = time.monotonic()
            assert get(base + "/login", context=trust)[0] == 200
            assert time.monotonic() - t0 < 5
        # plain HTTP gets no answer at all, and a client trusting another certificate
        # refuses the handshake: the token never crosses in clear or to an impostor
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            get(f"http://127.0.0.1:{con.port}/login")
        other, _, _, _ = issue(tmp_path, "impostor", ca=True)
        with pytest.raises(urllib.error.URLError) as ei:
            login(base, context=ssl.create_default_context(cafile=str(other)))
        assert isinstance(ei.value.reason, ssl.SSLCertVerificationError)
    finally:
        con.stop()


def test_console_tls_with_a_key_of_another_certificate_names_the_keys(tmp_path: Path) -> None:
    cert, _, _, _ = issue(tmp_path, "server", ca=True)
    _, other_key, _, _ = issue(tmp_path, "other", ca=True)
    settings = make_settings(tmp_path, tls_cert=str(cert), tls_key=str(other_key))
    with pytest.raises(ConfigError) as ei:
        console_ssl_context(settings.server)
    assert str(ei.value).startswith(
        f"server.tls_cert / server.tls_key: {cert} and {other_key} are not a certificate "
        "and its private key")
    assert console_ssl_context(make_settings(tmp_path).server) is None  # TLS off: plain
