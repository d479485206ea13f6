"""The console's experiment pages in a real headless Chromium against a real server: the
list, one experiment's arms and state, stopping it (confirmed on its own page), the admin
session they need (plain urllib: what a request without one gets), and the results hook."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import online_bundles as kb
import pytest
from test_console import _cells, browser, sign_in  # noqa: F401 - browser is a fixture
from test_online_server import Running

from online.console.app import create_console
from online.console.data import ConsoleData

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, str]]:
    tmp = tmp_path_factory.mktemp("experiments-console")
    kb.build(tmp / "models", "v2", make_current=False)
    run = Running(tmp, console_port=0)
    con = create_console(run.settings, run.server)
    con.start()
    yield run, f"http://127.0.0.1:{con.port}"
    con.stop()
    run.close()


def _after(driver, css: str) -> None:  # type: ignore[no-untyped-def]
    """Wait for the page a click leads to (a click returns before it has loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def test_list_detail_and_a_confirmed_stop(console, browser) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    run, base = console
    browser.get(f"{base}/experiments")
    sign_in(browser)
    assert "No experiments yet" in browser.find_element(By.TAG_NAME, "main").text
    exp = run.client.create_experiment("blend test", [
        {"name": "control", "share": 0.6},
        {"name": "challenger", "share": 0.3, "model_version": "v2"},
        {"name": "holdout", "share": 0.1, "popularity": True}],
        traffic=0.5, salt="console-salt", description="v2 against the champion")
    browser.get(f"{base}/experiments")
    (row,) = _cells(browser, "experiments")
    assert row[:5] == [exp.experiment_id, "blend test", "running",
                       "control 60%, challenger 30%, holdout 10%", "50.0%"]

    browser.find_element(By.LINK_TEXT, exp.experiment_id).click()
    _after(browser, "#arms")
    assert browser.find_element(By.ID, "state").text == "running"
    assert _cells(browser, "arms") == [["control", "60.0%", "champion (CURRENT)", ""],
                                       ["challenger", "30.0%", "v2", ""],
                                       ["holdout", "10.0%", "popularity ranking", ""]]
    main = browser.find_element(By.TAG_NAME, "main").text
    assert "console-salt" in main and "v2 against the champion" in main
    assert "No analysis yet" in browser.find_element(By.ID, "results").text

    browser.find_element(By.CSS_SELECTOR, "form#stop button").click()  # asks first
    _after(browser, "form#confirm")
    assert "Stop experiment" in browser.find_element(By.TAG_NAME, "main").text
    assert run.client.get_experiment(exp.experiment_id).state == "running"
    browser.find_element(By.CSS_SELECTOR, "form#confirm button").click()
    _after(browser, "#arms")
    assert browser.find_element(By.ID, "state").text == "stopped"
    assert f"experiment {exp.experiment_id} is stopped" in \
        browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    assert not browser.find_elements(By.CSS_SELECTOR, "form#stop")
    assert run.client.get_experiment(exp.experiment_id).state == "stopped"
    assert run.client.recommend("uA0", k=1).experiment_id == ""

    browser.get(f"{base}/experiments/exp-nope")
    assert "no experiment 'exp-nope'" in browser.find_element(By.TAG_NAME, "main").text


def test_the_pages_and_the_stop_need_the_admin_session(console) -> None:
    run, base = console
    exp = run.client.create_experiment("guarded", [{"name": "a", "share": 0.5},
                                                   {"name": "b", "share": 0.5}])
    try:
        for path in ("/experiments", f"/experiments/{exp.experiment_id}"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 401
            page = err.value.read().decode()
            assert "guarded" not in page and "shares" not in page  # the login form only
        body = urllib.parse.urlencode({"confirm": "yes"}).encode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/experiments/{exp.experiment_id}/stop", data=body,
                                   timeout=10)
        assert err.value.code == 403
        assert run.client.get_experiment(exp.experiment_id).state == "running"
    finally:
        run.client.stop_experiment(exp.experiment_id)


def test_experiment_results_is_empty_while_the_table_does_not_exist(console) -> None:
    run, _ = console
    data = ConsoleData(run.server)
    try:
        assert not run.server.lake.exists("experiment_results")
        assert data.experiment_results("exp-anything") == []
    finally:
        data.close()
