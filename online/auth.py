"""Who may call what: the admin token (admin port) and access keys (public port).

The one `ServiceInterceptor` asks a guard once per method for a check (None: the method
needs no credentials, like health checks) and runs it on every call's metadata before the
handler. A failed check raises `Unauthenticated` (no or an unknown credential) or
`PermissionDenied` (a valid key without the method's scope); the interceptor maps them.

Public-port policy (`server.auth`, like Redis' protected mode): with `keys`, calls need a
key from `server.keys_file` holding the method's scope; while that file holds no key, a
server bound only to loopback runs open with a warning and any other refuses to start, so
`make run` needs no setup and a server exposed by mistake is not open to the network.
The admin token gets the same treatment: off loopback, the shipped, an empty or a short
token refuses the start (`admin_guard`); on loopback it is a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from lake.config import DEFAULT_ADMIN_TOKEN, ConfigError, ServerSettings, Settings
from online.errors import PermissionDenied, Unauthenticated
from online.keys import KEY_PREFIX, SCOPES, AccessKey, KeysError, KeyStore, key_hash, keys_file

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Health checks (load balancers, k8s probes) and reflection (the schema is public)."""
METHOD_SCOPES = {"Recommend": "recommend", "RecommendBatch": "recommend",
                 "SimilarItems": "recommend", "IngestEvents": "ingest",
                 "UpsertItems": "catalogue"}
"""The scope each public method needs; a method missing here is refused to every key."""
MIN_ADMIN_TOKEN_CHARS = 16
"""Off loopback, a shorter admin token refuses the start (`openssl rand -hex 16` gives 32)."""
REFRESH_S = 1.0
"""How often (at most) a call looks whether the keys file changed: keys created or revoked
with the CLI apply to a running server within this time, for one stat per second."""

Check = Callable[[Iterable[tuple[str, Any]] | None], "AccessKey | None"]
"""Raises when the call may not proceed; returns the access key it matched (None: the call
needs no key, e.g. an open public port or the admin token)."""

CALLER: ContextVar[AccessKey | None] = ContextVar("lambdarec_caller", default=None)
"""The access key of the call being handled, set by `online.service.ServiceInterceptor`
before the handler runs (gRPC runs both in one thread): what handlers scope by (the key's
name is the tenant) and check optional scopes against. None: no key (open port, admin)."""


INTERNAL_KEY_ID = "internal"
"""`AccessKey.id` of the in-process key the web console calls the public API with."""


def caller_tenant() -> str:
    """The tenant of the gRPC call being handled: its access key's name (so a rotated key
    keeps its event ids and its rate budget); "" without a key (open port, admin port) and
    for the console's own key, like an open port's."""
    key = CALLER.get()
    return "" if key is None or key.id == INTERNAL_KEY_ID else key.name


def caller_has(scope: str) -> bool:
    """Whether the current call may use `scope`: its key holds it, or the port runs open."""
    key = CALLER.get()
    return key is None or scope in key.scopes


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The credential of an `authorization: Bearer <credential>` header (None: no header)."""
    for key, value in metadata or ():
        if key == "authorization":
            got = value.encode() if isinstance(value, str) else bytes(value)
            return got[len(b"Bearer "):] if got.startswith(b"Bearer ") else b""
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, "", "0.0.0.0" handled above
        return False


class AdminToken:
    """The admin port's single bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def checker(self, full_method: str) -> Check | None:
        if full_method.startswith(EXEMPT_PREFIXES):
            return None

        def check(metadata: Iterable[tuple[str, Any]] | None) -> AccessKey | None:
            got = bearer(metadata)
            # an empty token (possible on loopback only) admits no one, not every "Bearer "
            if not got or not self._token or not hmac.compare_digest(got, self._token):
                raise Unauthenticated("missing or invalid 'authorization: Bearer <token>'")
            return None
        return check


class AccessKeys:
    """The public port's keys, re-read from the keys file when it changes.

    `internal_key` holds every scope, lives only in this process' memory and is what the
    in-process web console calls the public API with.
    """

    def __init__(self, store: KeyStore, *, open_when_empty: bool,
                 refresh_s: float = REFRESH_S) -> None:
        self.store = store
        self.open_when_empty = open_when_empty
        self.refresh_s = refresh_s
        self.internal_key = KEY_PREFIX + secrets.token_urlsafe(32)
        self._internal = AccessKey(id=INTERNAL_KEY_ID, name="this server's console", scopes=SCOPES,
                                   sha256=key_hash(self.internal_key), created_at="")
        self._lock = threading.Lock()
        self._next = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, AccessKey] = {}
        self._read(self._file_stamp(), strict=True)

    @property
    def keys(self) -> list[AccessKey]:
        self._refresh()
        return list(self._keys.values())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.store.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self, stamp: tuple[int, int, int] | None, *, strict: bool) -> None:
        try:
            keys = self.store.load()
        except KeysError as exc:
            if strict:
                raise
            # The CLI writes atomically, so this is a hand edit: keep enforcing the last
            # good keys rather than open up or lock everyone out.
            log.warning("keys file unreadable; keeping the keys read before",
                        extra={"error": str(exc)})
            return
        self._keys = {k.sha256: k for k in keys}
        self._stamp = stamp

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        with self._lock:
            if now < self._next:
                return
            self._next = now + self.refresh_s
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._read(stamp, strict=False)

    def checker(self, full_method: str) -> Check | None:
        if full_method.startswith(EXEMPT_PREFIXES):
            return None
        method = full_method.rsplit("/", 1)[-1]
        scope = METHOD_SCOPES.get(method)

        def check(metadata: Iterable[tuple[str, Any]] | None) -> AccessKey | None:
            self._refresh()
            keys = self._keys
            if self.open_when_empty and not keys:
                return None
            got = bearer(metadata)
            if not got:
                raise Unauthenticated(f"{method} needs an access key: send 'authorization: "
                                      "Bearer <key>' (keys: python -m online.keys create)")
            digest = hashlib.sha256(got).hexdigest()
            key = keys.get(digest) or (self._internal if hmac.compare_digest(
                digest, self._internal.sha256) else None)
            if key is None:
                raise Unauthenticated("invalid or revoked access key")
            if scope not in key.scopes:
                raise PermissionDenied(f"access key {key.name!r} lacks the scope {method} "
                                       f"needs ({scope or 'none grants it'}); it has "
                                       f"{', '.join(key.scopes)}")
            return key
        return check


def public_guard(settings: Settings) -> AccessKeys | None:
    """The public port's guard under `server.auth` (None: open); refuses to start a server
    reachable from other hosts while no key exists."""
    srv = settings.server
    if srv.auth == "none":
        log.warning("server.auth is none: the public service accepts every call without an "
                    "access key", extra={"host": srv.host})
        return None
    loopback = is_loopback(srv.host)
    try:
        path = keys_file(settings)
        guard = AccessKeys(KeyStore(path), open_when_empty=loopback)
    except KeysError as exc:
        raise ConfigError(f"server.keys_file: {exc}") from None
    if not guard.keys:
        if not loopback:
            raise ConfigError(
                f"server.host {srv.host!r} is not loopback and server.keys_file "
                f"{path} holds no access key: create one (python -m online.keys "
                "create --name NAME --scopes recommend,ingest,catalogue) or set "
                "server.auth: none to serve without keys")
        log.warning("no access keys yet: the public service accepts calls without a key "
                    "while it listens on loopback only; create keys with python -m "
                    "online.keys create", extra={"host": srv.host,
                                                "keys_file": str(path)})
    return guard


def weak_admin_token(token: str) -> str | None:
    """What is wrong with `token` as the admin token (None: nothing): the shipped default,
    empty, or shorter than `MIN_ADMIN_TOKEN_CHARS`."""
    if token == DEFAULT_ADMIN_TOKEN:
        return f"is the default {DEFAULT_ADMIN_TOKEN!r}"
    if not token:
        return "is empty"
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        return f"has {len(token)} characters, fewer than {MIN_ADMIN_TOKEN_CHARS}"
    return None


def refuse_weak_admin_token(srv: ServerSettings) -> str | None:
    """Raise `ConfigError` when a server reachable from other hosts would start with a weak
    admin token; on loopback return the weakness (None: a good token) for a warning.

    Cheap and side-effect free, so starters (`create_server`, `make run`) call it before any
    work."""
    problem = weak_admin_token(srv.admin_token)
    if problem is not None and not is_loopback(srv.host):
        raise ConfigError(
            f"server.host {srv.host!r} is not loopback and server.admin_token {problem}: "
            f"set LAMBDAREC__SERVER__ADMIN_TOKEN to a secret of at least "
            f"{MIN_ADMIN_TOKEN_CHARS} characters (e.g. openssl rand -hex 16)")
    return problem


def admin_guard(srv: ServerSettings) -> AdminToken:
    """The admin port's guard; refuses (`ConfigError`) a weak admin token off loopback."""
    problem = refuse_weak_admin_token(srv)
    if problem is None:
        pass
    elif srv.admin_token == DEFAULT_ADMIN_TOKEN:
        log.warning(f"server.admin_token {problem}: anyone who reaches the admin port can "
                    "reload models and erase users; set LAMBDAREC__SERVER__ADMIN_TOKEN",
                    extra={"host": srv.host})
    elif not srv.admin_token:
        log.warning("server.admin_token is empty: the admin port and the console admit no "
                    "one; set LAMBDAREC__SERVER__ADMIN_TOKEN", extra={"host": srv.host})
    else:
        log.warning(f"server.admin_token {problem}: easy to guess, and refused off "
                    "loopback; set LAMBDAREC__SERVER__ADMIN_TOKEN", extra={"host": srv.host})
    return AdminToken(srv.admin_token)
