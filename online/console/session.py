"""The console's admin sessions: signed, expiring session ids in a cookie, never the token.

Signing in with the admin token (`server.admin_token`, compared in constant time) starts a
session: a random id kept in this process and sent to the browser signed and timestamped by
`itsdangerous` (a key made at start, so a restart signs everyone out). A cookie is valid
while its signature checks, it is younger than `SESSION_TTL_S` and its id is still live:
logging out (or expiry) forgets the id, so a copied cookie stops working too.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_TTL_S = 8 * 3600
"""How long a session lasts from sign-in (a working day); then the console asks again."""
SALT = "lambdarec-console-session"


class Sessions:
    """Live console sessions of one process."""

    def __init__(self, admin_token: str, ttl_s: int = SESSION_TTL_S) -> None:
        self._token = admin_token.encode()
        self.ttl_s = ttl_s
        self._signer = URLSafeTimedSerializer(secrets.token_bytes(32), salt=SALT)
        self._lock = threading.Lock()
        self._live: dict[str, float] = {}  # session id -> time.time() it expires

    def login(self, token: str) -> str | None:
        """A new session's cookie value when `token` is the admin token, else None."""
        got = token.encode()
        # an empty admin token (allowed on loopback only) signs no one in
        if not self._token or not hmac.compare_digest(got, self._token):
            return None
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._live = {s: t for s, t in self._live.items() if t > now}  # drop expired
            self._live[sid] = now + self.ttl_s
        return self._signer.dumps(sid)

    def _sid(self, cookie: str) -> str | None:
        """The live session id `cookie` carries (None: unsigned, forged, expired or over)."""
        if not cookie:
            return None
        try:
            sid = self._signer.loads(cookie, max_age=self.ttl_s)
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(sid, str):
            return None
        with self._lock:
            expires = self._live.get(sid)
        return sid if expires is not None and expires > time.time() else None

    def valid(self, cookie: str) -> bool:
        return self._sid(cookie) is not None

    def logout(self, cookie: str) -> None:
        """End the session `cookie` carries (nothing when it carries none)."""
        sid = self._sid(cookie)
        if sid is not None:
            with self._lock:
                self._live.pop(sid, None)

    def __len__(self) -> int:
        return len(self._live)
