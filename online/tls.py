"""TLS for both gRPC ports, from `server.tls_cert` / `tls_key` / `tls_client_ca`.

`server_credentials` is what the server binds with; `own_client_tls` is what this
project's own clients (the in-process console, reload notifications) pass to
`lambdarec_client.Client` to reach a server so configured. grpc is imported where used, so
DAG files can import this module at parse time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from lake.config import ConfigError, ServerSettings


class ClientTLS(TypedDict, total=False):
    """`lambdarec_client.Client` keyword arguments for TLS."""

    root_cert: bytes
    cert_chain: bytes
    private_key: bytes


def _pem(key: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"server.{key}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"server.{key}: {path} is not a PEM file")
    return data


def _cert_and_key(srv: ServerSettings) -> tuple[Path, Path] | None:
    """(tls_cert, tls_key) when TLS is on, None when off; raises on a half-done setting."""
    if srv.tls_cert is not None and srv.tls_key is not None:
        return srv.tls_cert, srv.tls_key
    if srv.tls_cert is not None or srv.tls_key is not None:
        raise ConfigError("server.tls_cert and server.tls_key: set both (TLS) or neither")
    if srv.tls_client_ca is not None:
        raise ConfigError("server.tls_client_ca: needs server.tls_cert and server.tls_key")
    return None


def server_credentials(srv: ServerSettings) -> Any:
    """`grpc.ServerCredentials` for both ports, or None for plaintext."""
    paths = _cert_and_key(srv)
    if paths is None:
        return None
    import grpc

    chain, key = _pem("tls_cert", paths[0]), _pem("tls_key", paths[1])
    ca = _pem("tls_client_ca", srv.tls_client_ca) if srv.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def own_client_tls(srv: ServerSettings) -> ClientTLS:
    """`Client` keyword arguments for this project's own calls to a server configured by
    `srv`: trust `tls_cert` itself (self-signed, or a file that also holds its CA), and
    present it as the client certificate when the server asks for one."""
    paths = _cert_and_key(srv)
    if paths is None:
        return ClientTLS()
    cert = _pem("tls_cert", paths[0])
    if srv.tls_client_ca is None:
        return ClientTLS(root_cert=cert)
    return ClientTLS(root_cert=cert, cert_chain=cert, private_key=_pem("tls_key", paths[1]))
