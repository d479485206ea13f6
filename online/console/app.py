"""The console's HTTP server: routes, the admin login, static files and report plots.

Standard library only (`http.server`), one thread per connection, bound to `server.host`.
Every page shows shoppers' data (histories, recommendations) or the models trained on it,
so every page needs the admin login: without a valid session a request gets the login form
and nothing else (401 for a page, 403 for an action), only the static styles and script are
public. The login is a plain HTML form (`POST /login`, field `token`: the admin token) so
scripts can sign in too; it starts a session (`online.console.session`) whose signed,
expiring id is the cookie (HttpOnly, SameSite=Strict, Secure over TLS), never the token.
With `server.tls_cert` the console speaks HTTPS with the gRPC ports' certificate and key.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
from dataclasses import asdict
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import grpc

from lake.config import Settings
from online.auth import is_loopback
from online.console import pages
from online.console.data import ConsoleData
from online.console.session import Sessions
from online.ports import ensure_free
from online.tls import console_ssl_context

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "lambdarec_session"
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
PLOT_NAME = re.compile(r"^[\w.-]+\.png$")
EXAMPLE_USERS = 8
MAX_FORM_BYTES = 64 * 1024
"""Forms are a token or an item id: a larger body is refused before it is read."""
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
"""A connection that sends nothing for this long is closed (its thread freed)."""
SAFE_NEXT = re.compile(r"/(?![/\\])[\x21-\x7e]*")
"""Where a sign-in may return to: a path on this console (not `//host`), printable ASCII."""


class Console:
    """The console over one running `online.server.OnlineServer`."""

    def __init__(self, settings: Settings, data: ConsoleData, httpd: ThreadingHTTPServer,
                 *, tls: bool = False) -> None:
        self.settings = settings
        self.data = data
        self.httpd = httpd
        self.port = int(httpd.server_address[1])
        self.scheme = "https" if tls else "http"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="console",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.data.close()


class _TLSServer(ThreadingHTTPServer):
    """HTTPS: each connection's handshake runs in its own thread. (Wrapping the listening
    socket would run it in `accept`, where one silent client stalls everyone else.)"""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(address, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            request = self.context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # plain HTTP, a scanner, a client that gave up
            # wrap_socket has closed the connection (the plain socket is detached)
            log.debug("console TLS handshake failed", extra={"error": str(exc)})
            return
        super().process_request_thread(request, client_address)


def create_console(settings: Settings, server: Any) -> Console:
    """Bind (not start) the console on `server.host:server.console_port`; `server` must
    have its gRPC ports bound (`create_server`)."""
    srv = settings.server
    ensure_free(srv.host, srv.console_port, "server.console_port")
    context = console_ssl_context(srv)  # a bad certificate fails before the port is bound
    if context is None and not is_loopback(srv.host):
        log.warning("the console serves plain HTTP beyond loopback: the admin token and the "
                    "session cookie cross the network in clear; set server.tls_cert and "
                    "server.tls_key", extra={"host": srv.host})
    data = ConsoleData(server)
    handler = type("Handler", (_Handler,), {"data": data,
                                            "sessions": Sessions(srv.admin_token),
                                            "secure": context is not None})
    address = (srv.host, srv.console_port)
    httpd = (_TLSServer(address, handler, context) if context is not None
             else ThreadingHTTPServer(address, handler))
    httpd.daemon_threads = True
    return Console(settings, data, httpd, tls=context is not None)


class Redirect(Exception):
    def __init__(self, location: str, note: str = "") -> None:
        super().__init__(location)
        self.location = location + (f"?note={quote(note)}" if note else "")


class BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    data: ConsoleData
    sessions: Sessions
    secure: bool
    server_version = "lambdarec-console"
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("console " + format, *args)

    # -- plumbing --------------------------------------------------------------------------
    def _cookie(self) -> str:
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:  # a malformed header is no session, not an error page
            return ""
        return cookie[COOKIE].value if COOKIE in cookie else ""

    def _signed_in(self) -> bool:
        return self.sessions.valid(self._cookie())

    def _set_cookie(self, value: str, max_age: int) -> str:
        return (f"{COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict"
                + ("; Secure" if self.secure else ""))

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")  # no clickjacking of the admin forms
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, title: str, body: str, status: int = 200, script: bool = False,
              signed_in: bool = True) -> None:
        text = pages.page(title, body, signed_in=signed_in, script=script)
        self._send(status, text.encode(), "text/html; charset=utf-8")

    def _login_page(self, status: int, note: str = "", next_path: str = "/") -> None:
        self._html("Sign in", pages.login(next_path, note), status=status, signed_in=False)

    def _form(self) -> dict[str, str]:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest(400, "Content-Length: not a number") from None
        if n < 0 or n > MAX_FORM_BYTES:
            raise BadRequest(413, f"a form of at most {MAX_FORM_BYTES} bytes")
        raw = self.rfile.read(n).decode("utf-8", "replace") if n else ""
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if method == "GET" and len(parts) == 2 and parts[0] == "static":
                self._static(parts[1])  # public: the login page needs the styles
            elif method == "POST" and parts in (["login"], ["logout"]):
                self._sign_in(self._form()) if parts == ["login"] else self._sign_out()
            elif not self._signed_in():
                # nothing but the login form: every page shows shopper data or models
                if method == "GET":
                    self._login_page(200 if parts == ["login"] else 401,
                                     next_path="/" if parts == ["login"] else self.path)
                else:
                    self._login_page(403, "sign in first: this action needs the admin login")
            elif method == "GET":
                self._get(parts, query)
            else:
                self._post(parts, self._form())
        except BadRequest as exc:
            self._send(exc.status, str(exc).encode(), "text/plain; charset=utf-8")
        except Redirect as r:
            self._send(303, b"", "text/plain", {"Location": r.location})
        except grpc.RpcError as exc:
            self._html("Error", pages.message(f"{exc.code().name}: {exc.details()}", "bad"),
                       status=502 if exc.code() == grpc.StatusCode.UNAVAILABLE else 400)
        except LookupError as exc:
            self._html("Not found", pages.message(str(exc), "bad"), status=404)
        except (ConnectionError, TimeoutError):  # the client went away
            self.close_connection = True

    def _static(self, name: str) -> None:
        path = STATIC / name
        if "/" in name or not path.is_file():
            self._send(404, b"not found", "text/plain")
            return
        self._send(200, path.read_bytes(), TYPES.get(path.suffix, "text/plain"))

    def _sign_in(self, form: dict[str, str]) -> None:
        target = form.get("next", "/")
        target = target if SAFE_NEXT.fullmatch(target) else "/"  # no open redirect
        cookie = self.sessions.login(form.get("token", ""))
        if cookie is None:
            self._login_page(403, "wrong token", next_path=target)
            return
        self._send(303, b"", "text/plain", {
            "Location": target,
            "Set-Cookie": self._set_cookie(cookie, self.sessions.ttl_s)})

    def _sign_out(self) -> None:
        self.sessions.logout(self._cookie())  # the id dies here: a copied cookie is over too
        self._send(303, b"", "text/plain", {"Location": "/",
                                            "Set-Cookie": self._set_cookie("", 0)})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    # -- routes ----------------------------------------------------------------------------
    def _get(self, parts: list[str], q: dict[str, str]) -> None:
        d = self.data
        note = q.get("note", "")
        match parts:
            case []:
                self._html("Console", pages.home(d.serving(), d.active_users(EXAMPLE_USERS)))
            case ["users"] | ["items"] if q.get("id"):
                raise Redirect(f"/{parts[0]}/{quote(q['id'], safe='')}")
            case ["users", user_id]:
                self._html(f"User {user_id}", pages.user(
                    user_id, d.recommend(user_id), d.recent_events(user_id), note=note))
            case ["items", item_id]:
                self._html(f"Item {item_id}", pages.item(d.item(item_id), d.similar(item_id)))
            case ["models"]:
                runs, current = d.model_runs()
                self._html("Model runs", pages.models(
                    runs, current, note=note, gate_metric=d.settings.gate.metric))
            case ["models", version]:
                run, trials = d.model_run(version)
                if run is None:
                    raise LookupError(f"no model run {version!r}")
                self._html(f"Model {version}", pages.model(
                    run, trials, d.plots(version), d.settings.gate.metric))
            case ["reports", version, name] if PLOT_NAME.match(name) and "/" not in version:
                path = d.report_dir(version) / name
                if not path.is_file():
                    raise LookupError(f"no plot {name} for {version}")
                self._send(200, path.read_bytes(), "image/png")
            case ["experiments"]:
                self._html("Experiments", pages.experiments(d.experiments(), note=note))
            case ["experiments", experiment_id]:
                self._html(f"Experiment {experiment_id}", pages.experiment(
                    d.experiment(experiment_id), d.experiment_results(experiment_id),
                    note=note))
            case ["live"]:
                self._html("Live", pages.live(), script=True)
            case ["api", "stats"]:
                body = json.dumps(asdict(d.sample())).encode()
                self._send(200, body, "application/json")
            case ["login"]:  # signed in already
                raise Redirect("/")
            case _:
                raise LookupError(f"no page {self.path}")

    def _post(self, parts: list[str], form: dict[str, str]) -> None:
        d = self.data
        match parts:
            case ["users", user_id, "events"]:
                reply = d.ingest(user_id, form.get("item_id", ""),
                                 form.get("event_type", "view"))
                rejected = reply.get("rejected") or []
                note = (f"rejected: {rejected[0].get('reason')}" if rejected else
                        f"ingested {form.get('event_type')} of {form.get('item_id')}; "
                        "recommendations below already include it")
                raise Redirect(f"/users/{quote(user_id, safe='')}", note)
            case ["users", user_id, "forget"]:
                d.client.forget_user(user_id)
                raise Redirect(f"/users/{quote(user_id, safe='')}", "user erased everywhere")
            case ["models", "reload"]:
                reply = d.client.reload()
                raise Redirect("/models", f"serving {reply.model_version}")
            case ["models", "rollback"]:
                raise Redirect("/models", d.rollback(form.get("version") or None))
            case ["experiments", experiment_id, "stop"]:
                if form.get("confirm") != "yes":  # the first press asks first
                    self._html(f"Stop {experiment_id}?",
                               pages.confirm_stop(d.experiment(experiment_id)))
                    return
                raise Redirect(f"/experiments/{quote(experiment_id, safe='')}",
                               d.stop_experiment(experiment_id))
            case _:
                raise LookupError(f"no action {self.path}")
