"""The web console in a real headless Chromium (Debian chromium + chromedriver), against a
real server on the known three-cluster bundle; assertions on the rendered DOM. The admin
login's HTTP contract (what a request without a session gets, the cookie) with plain
urllib requests."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from test_online_server import TOKEN, Running

from lake.tables import spec
from online.console.app import create_console
from online.console.session import Sessions

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.slow
REASON = "ndcg@10 0.1000 < popularity 0.2000 x (1 + 0.1) = 0.2200"


def _png(width: int = 4, height: int = 3) -> bytes:
    """A tiny valid grey PNG (the report plot the model page shows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                            0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _runs(run: Running) -> None:
    """A rejected run v1 with one tuning trial and a plot, as publish and tune write them."""
    created = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    metrics = {"models": {"als": {"ndcg@10": 0.1, "recall@20": 0.3},
                          "popularity": {"ndcg@10": 0.2, "recall@20": 0.4}},
               "intervals": {"models": {"als": {"ndcg@10": [0.08, 0.12]}}}}
    rows = [
        {"model_version": "v1", "created_at": created, "as_of": created.date(),
         "backend": "implicit", "params": json.dumps({"factors": 8}),
         "metrics": json.dumps(metrics), "status": "rejected", "gate_reason": REASON,
         "bundle_path": None},
        {"model_version": "v1.t00", "created_at": created, "as_of": created.date(),
         "backend": "ials", "params": json.dumps({"factors": 16}),
         "metrics": json.dumps({"validation": {"ndcg@10": 0.25}}), "status": "trial",
         "gate_reason": None, "bundle_path": None},
    ]
    run.server.lake.upsert("model_runs", pa.Table.from_pylist(rows, spec("model_runs").schema))
    reports = run.models / "reports" / "v1"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics_vs_k.png").write_bytes(_png())


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, str]]:
    run = Running(tmp_path_factory.mktemp("console"), console_port=0)
    run.client.upsert_items([{"item_id": f"{c}{i}", "title": f"{name} {i}", "category": name}
                             for c, name in (("A", "alpha"), ("B", "beta"), ("C", "gamma"))
                             for i in range(10)])
    _runs(run)
    con = create_console(run.settings, run.server)
    con.start()
    yield run, f"http://127.0.0.1:{con.port}"
    con.stop()
    run.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMEDRIVER is None or shutil.which("chromium") is None:
        pytest.skip("needs Debian chromium + chromium-driver "
                    "(infra/scripts/ensure_system.sh installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or ""
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def _cells(driver, table_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]


def sign_in(driver, token: str = TOKEN) -> None:  # type: ignore[no-untyped-def]
    """Fill in the login form the current page shows and wait for the page it leads to."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, 'form#login input[name="token"]')
    box.send_keys(token)
    box.submit()  # returns before the next page has loaded: wait for it
    WebDriverWait(driver, 15).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, 'form[action="/logout"]')
        or "wrong token" in d.find_element(By.TAG_NAME, "main").text)


def test_user_lookup_shows_titles_categories_reasons_and_strategy(console, browser) -> None:
    from selenium.webdriver.common.by import By

    _, base = console
    browser.delete_all_cookies()
    browser.get(base + "/")
    assert browser.title.startswith("Sign in")  # nothing else before the login
    assert not browser.find_elements(By.CSS_SELECTOR, 'form[action="/users"]')
    sign_in(browser)
    assert browser.title.startswith("Console")
    box = browser.find_element(By.CSS_SELECTOR, 'form[action="/users"] input[name="id"]')
    box.send_keys("uA0")
    box.submit()
    assert browser.title.startswith("User uA0")
    assert browser.find_element(By.CLASS_NAME, "strategy").text == "personalised"
    rows = _cells(browser, "recommendations")
    assert [r[0] for r in rows[:3]] == ["A2", "A3", "A4"]  # the bundle's known answer
    assert rows[0][1:3] == ["alpha 2", "alpha"]
    assert set(rows[0][4].split(", ")) <= {"alpha 0", "alpha 1"} and rows[0][4]
    assert browser.find_elements(By.ID, "ingest")  # signed in: the admin's forms


def test_admin_ingests_a_test_event_and_the_answer_changes(console, browser) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, base = console
    browser.delete_all_cookies()
    browser.get(base + "/users/console-new")
    assert browser.title.startswith("Sign in")
    sign_in(browser, "wrong")
    assert "wrong token" in browser.find_element(By.CSS_SELECTOR, "main .bad").text
    assert not browser.find_elements(By.CLASS_NAME, "strategy")
    sign_in(browser)  # the form again, still bound for the user's page
    assert browser.title.startswith("User console-new")
    assert browser.find_element(By.CLASS_NAME, "strategy").text == "fallback"
    form = browser.find_element(By.ID, "ingest")
    item = form.find_element(By.NAME, "item_id")
    item.clear()
    item.send_keys("C4")
    Select(form.find_element(By.NAME, "event_type")).select_by_visible_text("purchase")
    form.submit()
    WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: "ingested purchase of C4" in d.find_element(By.CLASS_NAME, "note").text)
    assert browser.find_element(By.CLASS_NAME, "strategy").text == "personalised"
    assert [r[0] for r in _cells(browser, "recommendations")[:4]] == ["C0", "C1", "C2", "C3"]
    events = _cells(browser, "events")
    assert events[0][1:5] == ["purchase", "C4", "gamma 4", "gamma"]


def test_item_page_lists_similar_items(console, browser) -> None:
    _, base = console
    browser.delete_all_cookies()
    browser.get(base + "/items/C0")
    sign_in(browser)
    assert _cells(browser, "item")[0][:3] == ["C0", "gamma 0", "gamma"]
    assert _cells(browser, "similar")[0][:3] == ["C1", "gamma 1", "gamma"]


def test_model_run_shows_gate_decision_reason_intervals_trials_and_plots(console,
                                                                         browser) -> None:
    from selenium.webdriver.common.by import By

    _, base = console
    browser.delete_all_cookies()
    browser.get(base + "/models")
    sign_in(browser)
    (row,) = _cells(browser, "runs")
    assert row[:2] == ["v1", "rejected"] and row[4] == "0.1000 [0.0800, 0.1200]"
    assert row[6] == REASON
    browser.find_element(By.LINK_TEXT, "v1").click()
    gate = browser.find_element(By.ID, "gate")
    assert gate.text == f"Gate: REJECTED (status rejected): {REASON}"
    assert "bad" in gate.get_attribute("class")
    assert _cells(browser, "trials") == [[".t00", "ials", "factors=16", "0.2500"]]
    img = browser.find_element(By.CSS_SELECTOR, ".plots img")
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 4


def test_live_charts_plot_the_request_rate(console, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run, base = console
    browser.delete_all_cookies()
    browser.get(base + "/live")
    sign_in(browser)
    for _ in range(20):
        run.client.recommend("uA0", k=3)
    WebDriverWait(browser, 15).until(
        lambda d: int(d.find_element(By.ID, "live").get_attribute("data-samples") or 0) >= 2)
    assert float(browser.find_element(By.ID, "latency-now").text) >= 0.0
    assert float(browser.find_element(By.ID, "rate-now").text) >= 0.0
    assert float(browser.find_element(By.ID, "lag-now").text) >= 0.0  # ingest lag chart
    assert [c.get_attribute("id") for c in browser.find_elements(By.TAG_NAME, "canvas")] == [
        "rate", "latency", "lag"]


def test_signed_out_pages_show_only_the_login_form_and_log_out_ends_it(
        console, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run, base = console
    browser.delete_all_cookies()
    for path in ("/models", "/users/uA0", "/items/C0", "/live"):
        browser.get(base + path)
        assert browser.title.startswith("Sign in"), path
        assert not browser.find_elements(By.TAG_NAME, "table"), path
        assert not browser.find_elements(By.CSS_SELECTOR, "header a"), path  # no navigation
        assert not browser.find_elements(By.CSS_SELECTOR, 'form[action$="/forget"]'), path
    browser.get(base + "/models")
    sign_in(browser)
    assert browser.title.startswith("Model runs")  # back where the login started
    assert browser.find_elements(By.CSS_SELECTOR, 'form[action="/models/reload"]')
    assert browser.find_elements(By.CSS_SELECTOR, 'form[action="/models/rollback"]')
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    browser.find_element(By.CSS_SELECTOR, 'form[action="/logout"] button').click()
    WebDriverWait(browser, 15).until(lambda d: d.title.startswith("Sign in"))
    # the old cookie is dead on the server, not only deleted in this browser
    assert get(base + "/models", cookie=cookie["value"])[0] == 401
    assert [i.item_id for i in run.client.recommend("uA0", k=3).items] == ["A2", "A3", "A4"]


# -- the login over plain HTTP (urllib: what a script or an attacker sees) ----------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # hand the 303 back as it is


def get(url: str, *, cookie: str | None = None, data: dict[str, str] | None = None,
        extra_cookie: str = "", context: ssl.SSLContext | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, without following redirects."""
    headers = {}
    cookies = "; ".join(c for c in (f"lambdarec_session={cookie}" if cookie else "",
                                    extra_cookie) if c)
    if cookies:
        headers["Cookie"] = cookies
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers)
    opener = urllib.request.build_opener(_NoRedirect,
                                         urllib.request.HTTPSHandler(context=context))
    try:
        resp = opener.open(req, timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    with resp:
        return resp.status, dict(resp.headers), resp.read()


def login(base: str, token: str = TOKEN, next_path: str | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    form = {"token": token, **({"next": next_path} if next_path is not None else {})}
    return get(base + "/login", data=form, context=context)


def cookie_of(headers: dict[str, str]) -> str:
    name, value = headers["Set-Cookie"].split(";")[0].split("=", 1)
    assert name == "lambdarec_session"
    return value


PAGES = ("/", "/users/uA0", "/users?id=uA0", "/items/C0", "/items/A2", "/models",
         "/models/v1", "/reports/v1/metrics_vs_k.png", "/live", "/api/stats", "/no-such-page")
# what those pages show once signed in: uA0's history and answer, titles, the model runs
SECRETS = (b"alpha", b"gamma", b"A2", b"A3", b"Strategy", b"ndcg", REASON.encode(),
           b"metrics_vs_k", b"PNG", b"requests", b"<table")


def assert_login_form_only(status: int, headers: dict[str, str], body: bytes, *,
                           expected: int, where: str) -> None:
    assert status == expected, where
    assert headers["Content-Type"] == "text/html; charset=utf-8", where
    assert b"<title>Sign in" in body, where
    assert b'<form method="post" action="/login" id="login">' in body, where
    assert b'name="token"' in body, where
    shown = re.sub(rb'name="next" value="[^"]*"', b"", body)  # the page asked for, echoed
    leaked = [s for s in SECRETS if s in shown]
    assert not leaked, f"{where}: {leaked}"


def test_without_a_session_every_page_is_the_login_form(console) -> None:  # type: ignore[no-untyped-def]
    _, base = console
    for path in PAGES:
        assert_login_form_only(*get(base + path), expected=401, where=path)
        # neither the raw token as a cookie (what the console once set) nor a forged value
        for extra in (f"lambdarec_admin={TOKEN}", f"lambdarec_session={TOKEN}",
                      "lambdarec_session=x.y.z", 'lambdarec_session="\\x00;;"'):
            assert_login_form_only(*get(base + path, extra_cookie=extra), expected=401,
                                   where=f"{path} with {extra}")
    status, _, css = get(base + "/static/console.css")  # the login page's styles are public
    assert status == 200 and b"body" in css
    status, _, body = get(base + "/login")
    assert status == 200 and b'name="token"' in body


def test_actions_without_a_session_are_refused_with_the_login_form(console) -> None:  # type: ignore[no-untyped-def]
    run, base = console
    for path in ("/models/reload", "/models/rollback", "/users/uA0/forget",
                 "/users/uA0/events"):
        assert_login_form_only(*get(base + path, data={"version": "v1", "item_id": "C4"}),
                               expected=403, where=path)
    # nothing happened: uA0 is neither forgotten nor moved by a C4 event
    assert [i.item_id for i in run.client.recommend("uA0", k=3).items] == ["A2", "A3", "A4"]


def test_wrong_token_answers_wrong_token_and_no_cookie(console) -> None:  # type: ignore[no-untyped-def]
    _, base = console
    for token in ("wrong", "", TOKEN + "x", TOKEN[:-1]):
        status, headers, body = login(base, token, "/users/uA0")
        assert status == 403 and b"wrong token" in body, token
        assert "Set-Cookie" not in headers
        assert_login_form_only(status, headers, body, expected=403, where=token)
        assert b'name="next" value="/users/uA0"' in body  # still bound for the page asked


def test_the_session_cookie_is_signed_expiring_and_never_the_token(console) -> None:  # type: ignore[no-untyped-def]
    _, base = console
    status, headers, _ = login(base, next_path="/users/uA0")
    assert status == 303 and headers["Location"] == "/users/uA0"
    attrs = [a.strip() for a in headers["Set-Cookie"].split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"} <= set(attrs)
    assert "Secure" not in attrs  # plain HTTP here; over TLS it is (test_online_tls.py)
    value = cookie_of(headers)
    assert TOKEN not in headers["Set-Cookie"] and value.count(".") == 2  # id.timestamp.sig
    status, _, body = get(base + "/users/uA0", cookie=value)
    assert status == 200 and b"<title>User uA0" in body and b"alpha 2" in body
    # each login is its own session; a changed signature or id is no session
    other = cookie_of(login(base)[1])
    assert other != value
    sid, ts, sig = value.split(".")
    forged = f"{sid}.{ts}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    assert get(base + "/users/uA0", cookie=forged)[0] == 401
    assert get(base + "/users/uA0", cookie=f"{sid[:-1]}x.{ts}.{sig}")[0] == 401
    # logout ends the session on the server: the same cookie, replayed, is refused
    status, headers, _ = get(base + "/logout", cookie=value, data={})
    assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]
    assert_login_form_only(*get(base + "/users/uA0", cookie=value), expected=401,
                           where="after logout")
    assert get(base + "/users/uA0", cookie=other)[0] == 200  # the other session lives on


def test_login_returns_only_to_a_page_of_the_console(console) -> None:  # type: ignore[no-untyped-def]
    _, base = console
    for target, location in (("/models", "/models"), ("/items/C0?x=1", "/items/C0?x=1"),
                             ("//evil.example/", "/"), ("https://evil.example/", "/"),
                             ("/\\evil.example", "/"), ("/a\r\nSet-Cookie: x=1", "/")):
        status, headers, _ = login(base, next_path=target)
        assert status == 303 and headers["Location"] == location, target


def test_sessions_expire_and_an_empty_admin_token_signs_no_one_in() -> None:
    sessions = Sessions(TOKEN, ttl_s=1)
    cookie = sessions.login(TOKEN)
    assert cookie is not None and sessions.valid(cookie)
    assert not Sessions(TOKEN).valid(cookie)  # another process' key: not its cookie
    time.sleep(2.2)  # itsdangerous stamps whole seconds
    assert not sessions.valid(cookie)
    assert sessions.login("") is None
    empty = Sessions("")
    assert empty.login("") is None and empty.login("anything") is None


def test_a_flushed_event_is_listed_once(console) -> None:  # type: ignore[no-untyped-def]
    """After the bronze flush an event is both in the lake and still in the real-time state:
    the user page lists it once (it listed it twice, "real time" and "lake")."""
    run, base = console
    ts = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    run.client.ingest([{"event_id": "once-1", "user_id": "u-once", "item_id": "B3",
                        "event_type": "click", "ts": ts}])
    run.client.ingest([{"event_id": "once-2", "user_id": "u-once", "item_id": "B5",
                        "event_type": "view", "ts": ts.replace(minute=31)}])
    run.server.ingest.flush()
    run.client.ingest([{"event_id": "once-3", "user_id": "u-once", "item_id": "B7",
                        "event_type": "view", "ts": ts.replace(minute=32)}])  # not flushed
    cookie = cookie_of(login(base)[1])
    status, _, body = get(base + "/users/u-once", cookie=cookie)
    page = body.decode()
    assert status == 200
    rows = page[page.index('id="events"'):].split("</table>")[0]
    assert rows.count("<tr>") == 1 + 3  # the header and three events
    assert rows.count(">B3<") == 1 and rows.count(">B5<") == 1 and rows.count(">B7<") == 1
