"""The TLS settings (`server.tls_cert` / `tls_key` / `tls_client_ca`), read and checked.

`tls_files` says whether TLS is on (and refuses a half-done setting), `read_pem` reads one
of the files with one line naming its key when it cannot. The server builds its
credentials from them (`online.tls`); `own_client_tls` is what this project's own clients
(the in-process console, reload notifications from the DAGs and `make pipeline`) pass to
`lambdarec_client.Client` to reach a server so configured. It lives in the contract so
that batch code reaches TLS servers without importing the server package; nothing here
imports grpc, so DAG files can import it at parse time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from lake.config import ConfigError, ServerSettings


class ClientTLS(TypedDict, total=False):
    """`lambdarec_client.Client` keyword arguments for TLS."""

    root_cert: bytes
    cert_chain: bytes
    private_key: bytes


def read_pem(key: str, path: Path) -> bytes:
    """The PEM file `path` named by setting `server.<key>`; ConfigError naming the key when
    it cannot be read or is not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"server.{key}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"server.{key}: {path} is not a PEM file")
    return data


def tls_files(srv: ServerSettings) -> tuple[Path, Path] | None:
    """(tls_cert, tls_key) when TLS is on, None when off; raises on a half-done setting."""
    if srv.tls_cert is not None and srv.tls_key is not None:
        return srv.tls_cert, srv.tls_key
    if srv.tls_cert is not None or srv.tls_key is not None:
        raise ConfigError("server.tls_cert and server.tls_key: set both (TLS) or neither")
    if srv.tls_client_ca is not None:
        raise ConfigError("server.tls_client_ca: needs server.tls_cert and server.tls_key")
    return None


def own_client_tls(srv: ServerSettings) -> ClientTLS:
    """`Client` keyword arguments for this project's own calls to a server configured by
    `srv`: trust `tls_cert` itself (self-signed, or a file that also holds its CA), and
    present it as the client certificate when the server asks for one."""
    paths = tls_files(srv)
    if paths is None:
        return ClientTLS()
    cert = read_pem("tls_cert", paths[0])
    if srv.tls_client_ca is None:
        return ClientTLS(root_cert=cert)
    return ClientTLS(root_cert=cert, cert_chain=cert, private_key=read_pem("tls_key", paths[1]))
