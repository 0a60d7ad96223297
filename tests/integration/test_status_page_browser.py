"""The status page in a real browser: Debian's headless Chromium driven by Selenium
through the system chromedriver, against `run`'s Service with a SQLite store.

Selenium is handed both paths (browser and driver), so Selenium Manager never looks for
or downloads anything. The page and the probes listen on separate ports; each refuses
the other's paths.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped,unused-ignore]
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.documents import OWNER, QUEUE_MAILBOX
from tests.storecases import accepted, mail, pdf, record
from worker.cli.audit import as_csv
from worker.config.web import WebSettings, WebUser
from worker.models import AuditFilter, DocumentState, PollReport, RouteScope
from worker.service.metrics import RelayMetrics
from worker.service.runner import Service
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore
from worker.web.app import COOKIE, StatusPage
from worker.web.server import WebServer

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
SCRIPT_SUBJECT = "<script>alert(1)</script> Rechnung"
FORMULA_FILE = '=HYPERLINK("http://evil.example/","open").pdf'
# A server's answer is text from outside too: it must show as text.
GREYLISTED = "451 4.7.1 <b>greylisted</b>, try again later"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status_of(url: str) -> int:
    try:
        with _OPENER.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


@dataclass
class Relay:
    store: SqlStore
    web: str  # base URL of the page
    probes: int  # port of /livez, /healthz, /metrics
    failed_id: int  # the failed document's sighting
    forwarded_id: int


def _seed(store: SqlStore) -> tuple[int, int]:
    now = datetime.now(UTC)
    sent, refused = record(
        store,
        mail(1, accepted(pdf("one"), invoice_number="1042")),
        mail(
            2,
            accepted(pdf("two"), invoice_number="2077", filename=FORMULA_FILE),
            subject=SCRIPT_SUBJECT,
        ),
        now=now - timedelta(minutes=5),
        advance_to=2,
    )
    due = store.claim_due(mailbox=QUEUE_MAILBOX, now=now, limit=10, owner=OWNER, lease_seconds=60)
    assert sent.document_id is not None and refused.document_id is not None
    assert {item.document_id for item in due} == {sent.document_id, refused.document_id}
    store.mark_failed(refused.document_id, owner=OWNER, answer="554 5.7.1 message refused")
    # The first one is refused for now, then goes out on its second attempt.
    store.mark_retry(
        sent.document_id,
        owner=OWNER,
        answer=GREYLISTED,
        next_attempt_at=now,
        failed=False,
    )
    (again,) = store.claim_due(
        mailbox=QUEUE_MAILBOX, now=now, limit=10, owner=OWNER, lease_seconds=60
    )
    assert again.document_id == sent.document_id
    store.mark_forwarded(
        sent.document_id,
        owner=OWNER,
        message_id="<out-1@relay.example>",
        answer="250 2.0.0 queued as 4XyZ",
        now=now,
        keep_pdf=True,
    )
    return sent.sighting_id, refused.sighting_id


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(store.engine)
    forwarded_id, failed_id = _seed(store)
    settings = WebSettings(
        port=0,
        host="127.0.0.1",
        users=(
            WebUser(name="accountant", password="correct horse battery"),
            # A user of another route: today every row is route `default`.
            WebUser(name="shop-b", password="shop b staple", scope=RouteScope.of(["shop-b"])),
        ),
        secret_key=os.urandom(32),
        keep_pdfs=True,
    )
    stop = threading.Event()
    holder: list[Service] = []
    page = StatusPage(
        settings=settings,
        reader=store,
        admin=store,
        sessions=store,
        poll_status=lambda: holder[0].poll_status(),  # noqa: PLW0108 - not built yet
    )
    server = WebServer(page.app, host=settings.host, port=0)
    probes = free_port()
    now = datetime.now(UTC)
    service = Service(
        poll=lambda: PollReport(mailbox="INBOX", started_at=now, finished_at=now),
        trigger=IntervalTrigger(seconds=3600, timezone="UTC"),
        http_port=probes,
        http_host="127.0.0.1",
        healthy_after_seconds=60,
        stop_event=stop,
        metrics=RelayMetrics(),
        side_servers=(server,),
    )
    holder.append(service)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run()), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: (
                server.address is not None and status_of(f"http://127.0.0.1:{probes}/livez") == 200
            )
        )
        address = server.address
        assert address is not None
        yield Relay(
            store=store,
            web=f"http://127.0.0.1:{address[1]}",
            probes=probes,
            failed_id=failed_id,
            forwarded_id=forwarded_id,
        )
    finally:
        stop.set()
        thread.join(15)
        store.close()
    assert result == [0]


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(
    tmp_path: Path, downloads: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WebDriver]:
    # Both paths are given, so Selenium Manager has nothing to find; offline, it could
    # not download anything even if it ran.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(
        service=ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()


def navigate_by(browser: WebDriver, act: Callable[[], object]) -> None:
    """Do what loads a new page (a click on a link or button, a script's submit) and
    wait until the old page is gone and the new one has loaded: `click()` alone does
    not wait for the navigation it starts."""
    old = browser.find_element(By.TAG_NAME, "html")
    act()
    wait = WebDriverWait(browser, 10)
    wait.until(expected_conditions.staleness_of(old))
    wait.until(lambda driver: driver.execute_script("return document.readyState") == "complete")


def click(browser: WebDriver, element: WebElement) -> None:
    navigate_by(browser, element.click)


def sign_in(browser: WebDriver, relay: Relay, user: str, password: str) -> None:
    browser.get(relay.web + "/login")
    browser.find_element(By.ID, "user").send_keys(user)
    browser.find_element(By.ID, "password").send_keys(password)
    click(browser, browser.find_element(By.ID, "signin"))


def screenshot(browser: WebDriver, name: str) -> None:
    # For the README's pictures: `INVOICE_RELAY_SCREENSHOTS=docs pytest ...`; off otherwise.
    folder = os.environ.get("INVOICE_RELAY_SCREENSHOTS")
    if folder:
        browser.save_screenshot(str(Path(folder) / f"status-page-{name}.png"))


def test_the_page_and_the_probes_keep_to_their_own_ports(relay: Relay) -> None:
    for path in ("/livez", "/healthz", "/metrics"):
        assert status_of(relay.web + path) == 404
        assert status_of(f"http://127.0.0.1:{relay.probes}{path}") in (200, 503)
    for path in ("/login", "/audit", "/static/style.css"):
        assert status_of(f"http://127.0.0.1:{relay.probes}{path}") == 404
    assert status_of(relay.web + "/login") == 200


def test_an_accountant_follows_a_failed_invoice_through_the_page(
    relay: Relay, browser: WebDriver, downloads: Path
) -> None:
    # No session: every page sends the browser to the sign-in form.
    browser.get(relay.web + "/audit")
    assert browser.current_url.endswith("/login")
    # A wrong password is refused.
    sign_in(browser, relay, "accountant", "wrong")
    assert "Wrong user name or password" in browser.find_element(By.ID, "problem").text
    screenshot(browser, "login")

    sign_in(browser, relay, "accountant", "correct horse battery")
    assert browser.current_url == relay.web + "/"
    assert "Route default" in browser.page_source
    assert "554 5.7.1 message refused" in browser.find_element(By.ID, "route-default").text
    screenshot(browser, "overview")

    # Search the audit log by invoice number.
    browser.get(relay.web + "/audit")
    browser.find_element(By.ID, "invoice").send_keys("2077")
    click(browser, browser.find_element(By.ID, "find"))
    assert "invoice=2077" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr")
    assert len(rows) == 1
    # The stranger's subject is text, not a script.
    assert SCRIPT_SUBJECT in rows[0].text
    assert browser.find_elements(By.TAG_NAME, "script") == []

    # The failed document's story, then retry: pending in the database.
    click(browser, rows[0].find_element(By.TAG_NAME, "a"))
    assert browser.current_url == f"{relay.web}/documents/{relay.failed_id}"
    assert browser.find_element(By.ID, "state").text == "failed"
    assert "554 5.7.1 message refused" in browser.find_element(By.ID, "answer").text
    assert SCRIPT_SUBJECT in browser.find_element(By.CSS_SELECTOR, "td.subject").text
    screenshot(browser, "document")
    click(browser, browser.find_element(By.ID, "retry"))
    assert browser.find_element(By.ID, "state").text == "pending"
    story = relay.store.document_story(relay.failed_id, RouteScope.everything())
    assert story is not None and story.state is DocumentState.PENDING

    # The forwarded one names its delivery id, and both its attempts: refused once,
    # then accepted, each with its time and the server's answer.
    browser.get(f"{relay.web}/documents/{relay.forwarded_id}")
    assert browser.find_element(By.ID, "delivery").text == "<out-1@relay.example>"
    attempts = [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in browser.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")
    ]
    assert [(outcome, via, answer) for _, outcome, via, answer in attempts] == [
        ("retry", "smtp", GREYLISTED),
        ("forwarded", "smtp", "250 2.0.0 queued as 4XyZ"),
    ]
    times = [datetime.strptime(when, "%Y-%m-%d %H:%M:%S UTC") for when, *_ in attempts]
    assert times == sorted(times)
    assert abs(times[-1].replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)
    assert browser.find_elements(By.CSS_SELECTOR, "#attempts b") == []  # no markup of theirs
    screenshot(browser, "attempts")

    # A POST without the CSRF token is refused (and changes nothing).
    navigate_by(
        browser,
        lambda: browser.execute_script(
            "const form = document.createElement('form');"
            "form.method = 'post'; form.action = arguments[0];"
            "document.body.appendChild(form); form.submit();",
            f"/documents/{relay.forwarded_id}/resend",
        ),
    )
    assert browser.find_element(By.TAG_NAME, "h1").text == "403"
    story = relay.store.document_story(relay.forwarded_id, RouteScope.everything())
    assert story is not None and story.state is DocumentState.FORWARDED

    # CSV of everything: the same bytes as `invoice-relay audit --format csv`.
    browser.get(relay.web + "/audit")
    browser.find_element(By.ID, "csv").click()
    exported = downloads / "audit.csv"
    wait_until(exported.exists)
    text = exported.read_text(encoding="utf-8")
    assert text == as_csv(relay.store.audit(AuditFilter()))
    assert "'" + FORMULA_FILE.replace('"', '""') in text

    # Logging out ends the session: the old cookie opens nothing.
    old = browser.get_cookie(COOKIE)
    assert old is not None
    click(browser, browser.find_element(By.ID, "logout"))
    assert browser.current_url.endswith("/login")
    browser.add_cookie({"name": COOKIE, "value": old["value"], "path": "/"})
    browser.get(relay.web + "/")
    assert browser.current_url.endswith("/login")


def test_a_user_of_another_route_cannot_open_a_document_by_its_url(
    relay: Relay, browser: WebDriver
) -> None:
    sign_in(browser, relay, "shop-b", "shop b staple")
    assert browser.current_url == relay.web + "/"
    browser.get(f"{relay.web}/documents/{relay.failed_id}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "404"
    browser.get(relay.web + "/audit")
    assert browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr") == []
    browser.get(f"{relay.web}/documents/{relay.forwarded_id}/pdf")
    assert browser.find_element(By.TAG_NAME, "h1").text == "404"


def test_the_pages_fit_a_phones_width(relay: Relay, browser: WebDriver) -> None:
    browser.set_window_size(390, 844)
    sign_in(browser, relay, "accountant", "correct horse battery")
    for path in ("/login", "/audit", f"/documents/{relay.failed_id}", "/"):
        browser.get(relay.web + path)
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;"
        )
        assert overflow <= 0, f"{path} is {overflow} px wider than the screen"
        # ... because the page's own stylesheet loaded (the CSP lets 'self' through).
        assert browser.execute_script("return getComputedStyle(document.body).margin;") == "0px"
    screenshot(browser, "phone")  # the overview, last
