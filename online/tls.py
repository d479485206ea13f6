"""TLS for both gRPC ports and the web console, from `server.tls_cert` / `tls_key` /
`tls_client_ca`.

`server_credentials` is what the server binds with; `console_ssl_context` what the console's
HTTP server wraps its connections with (the same certificate and key). The settings are
read and checked by `lake.tls`, which also holds what this project's own clients pass to
`lambdarec_client.Client` (`own_client_tls`). grpc is imported where used.
"""

from __future__ import annotations

import ssl
from typing import Any

from lake.config import ConfigError, ServerSettings
from lake.tls import read_pem, tls_files


def server_credentials(srv: ServerSettings) -> Any:
    """`grpc.ServerCredentials` for both ports, or None for plaintext."""
    paths = tls_files(srv)
    if paths is None:
        return None
    import grpc

    chain, key = read_pem("tls_cert", paths[0]), read_pem("tls_key", paths[1])
    ca = read_pem("tls_client_ca", srv.tls_client_ca) if srv.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def console_ssl_context(srv: ServerSettings) -> ssl.SSLContext | None:
    """The console's server-side TLS context (None: plain HTTP), TLS 1.2 or newer.

    It asks browsers for no client certificate even with `tls_client_ca`: the console's
    own door is the admin login, and a browser without the certificate could not reach it.
    """
    paths = tls_files(srv)
    if paths is None:
        return None
    read_pem("tls_cert", paths[0])  # one line naming the key for a missing or non-PEM file
    read_pem("tls_key", paths[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(paths[0], paths[1])
    except ssl.SSLError as exc:
        raise ConfigError(f"server.tls_cert / server.tls_key: {paths[0]} and {paths[1]} are "
                          f"not a certificate and its private key ({exc.reason or exc})"
                          ) from None
    return ctx
