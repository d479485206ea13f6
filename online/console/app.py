"""The console's HTTP server: routes, the admin check, static files and report plots.

Standard library only (`http.server`), one thread per request, bound to `server.host`.
Pages are read-only; writes (ingest a test event, reload, roll back, forget a user) need the
admin token, entered once and kept in an HttpOnly, SameSite=Strict cookie.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from dataclasses import asdict
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import grpc

from lake.config import Settings
from online.console import pages
from online.console.data import ConsoleData
from online.ports import ensure_free

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "lambdarec_admin"
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
PLOT_NAME = re.compile(r"^[\w.-]+\.png$")
EXAMPLE_USERS = 8


class Console:
    """The console over one running `online.server.OnlineServer`."""

    def __init__(self, settings: Settings, data: ConsoleData, httpd: ThreadingHTTPServer
                 ) -> None:
        self.settings = settings
        self.data = data
        self.httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="console",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.data.close()


def create_console(settings: Settings, server: Any) -> Console:
    """Bind (not start) the console on `server.host:server.console_port`; `server` must
    have its gRPC ports bound (`create_server`)."""
    srv = settings.server
    ensure_free(srv.host, srv.console_port, "server.console_port")
    data = ConsoleData(server)
    handler = type("Handler", (_Handler,), {"data": data,
                                            "token": srv.admin_token.encode()})
    httpd = ThreadingHTTPServer((srv.host, srv.console_port), handler)
    httpd.daemon_threads = True
    return Console(settings, data, httpd)


class Redirect(Exception):
    def __init__(self, location: str, note: str = "") -> None:
        super().__init__(location)
        self.location = location + (f"?note={quote(note)}" if note else "")


class Forbidden(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    data: ConsoleData
    token: bytes
    server_version = "lambdarec-console"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("console " + format, *args)

    # -- plumbing --------------------------------------------------------------------------
    def _admin(self) -> bool:
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        got = cookie[COOKIE].value.encode() if COOKIE in cookie else b""
        return bool(got) and hmac.compare_digest(got, self.token)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, title: str, body: str, status: int = 200, script: bool = False) -> None:
        text = pages.page(title, body, admin=self._admin(), script=script)
        self._send(status, text.encode(), "text/html; charset=utf-8")

    def _form(self) -> dict[str, str]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n).decode() if n else ""
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if method == "GET":
                self._get(parts, query)
            else:
                self._post(parts, self._form())
        except Redirect as r:
            self._send(303, b"", "text/plain", {"Location": r.location})
        except Forbidden:
            self._html("Admin token needed", pages.message(
                "This action changes the system: unlock admin with the token "
                "(server.admin_token) first.", "bad"), status=403)
        except grpc.RpcError as exc:
            self._html("Error", pages.message(f"{exc.code().name}: {exc.details()}", "bad"),
                       status=502 if exc.code() == grpc.StatusCode.UNAVAILABLE else 400)
        except LookupError as exc:
            self._html("Not found", pages.message(str(exc), "bad"), status=404)

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
                    user_id, d.recommend(user_id), d.recent_events(user_id),
                    admin=self._admin(), note=note))
            case ["items", item_id]:
                self._html(f"Item {item_id}", pages.item(d.item(item_id), d.similar(item_id)))
            case ["models"]:
                runs, current = d.model_runs()
                self._html("Model runs", pages.models(
                    runs, current, admin=self._admin(), note=note,
                    gate_metric=d.settings.gate.metric))
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
            case ["live"]:
                self._html("Live", pages.live(), script=True)
            case ["api", "stats"]:
                body = json.dumps(asdict(d.sample())).encode()
                self._send(200, body, "application/json")
            case ["static", name] if (STATIC / name).is_file() and "/" not in name:
                path = STATIC / name
                self._send(200, path.read_bytes(), TYPES.get(path.suffix, "text/plain"))
            case _:
                raise LookupError(f"no page {self.path}")

    def _post(self, parts: list[str], form: dict[str, str]) -> None:
        if parts == ["login"]:
            ok = hmac.compare_digest(form.get("token", "").encode(), self.token)
            if not ok:
                raise Forbidden
            cookie = (f"{COOKIE}={form['token']}; HttpOnly; SameSite=Strict; Path=/")
            self._send(303, b"", "text/plain", {"Location": self.headers.get("Referer") or "/",
                                                "Set-Cookie": cookie})
            return
        if parts == ["logout"]:
            self._send(303, b"", "text/plain",
                       {"Location": "/", "Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/"})
            return
        if not self._admin():
            raise Forbidden
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
            case _:
                raise LookupError(f"no action {self.path}")
