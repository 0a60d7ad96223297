"""worker.web: the status page's views with in-memory fakes (Starlette's TestClient):
sign-in, sessions, CSRF, the Origin check, headers, throttling, route scoping, escaping."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient

from tests.fakes import FakePageStore, PageRow
from worker.config.web import WebSettings, WebUser
from worker.models import (
    AttemptOutcome,
    AuditRow,
    DeliveryAttempt,
    DocumentState,
    Outcome,
    RouteScope,
)
from worker.web.app import COOKIE, StatusPage
from worker.web.auth import LoginThrottle
from worker.web.rendering import content_disposition

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
SECRET = b"k" * 32
PUBLIC = "https://relay.example.com"


def audit_row(
    row_id: int,
    *,
    outcome: Outcome = Outcome.FORWARDED,
    subject: str = "Invoice",
    filename: str = "invoice.pdf",
    sender: str = "billing@shop.example",
    invoice_number: str | None = None,
    duplicate_of: int | None = None,
) -> AuditRow:
    return AuditRow(
        id=row_id,
        received_at=T0 + timedelta(minutes=row_id),
        mail_date=None,
        mailbox="INBOX",
        uidvalidity=1,
        uid=row_id,
        message_id=f"<m{row_id}@shop.example>",
        sender=sender,
        subject=subject,
        filename=filename,
        size_bytes=100,
        sha256=f"{row_id:064x}",
        fingerprint=None,
        invoice_number=invoice_number,
        outcome=outcome,
        reason=None,
        duplicate_of=duplicate_of,
        forwarded_at=None,
        forwarded_message_id=None,
        attempts=1,
    )


@dataclass
class Clock:
    now: datetime = T0
    ticks: float = 1000.0

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.ticks

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.ticks += seconds


@dataclass
class Page:
    client: TestClient
    store: FakePageStore
    clock: Clock
    app: StatusPage
    users: dict[str, str] = field(default_factory=dict)


def make_page(
    *, https: bool = False, keep_pdfs: bool = False, users: tuple[WebUser, ...] | None = None
) -> Page:
    store = FakePageStore()
    store.add(
        PageRow(
            route="shop-a",
            row=audit_row(1, invoice_number="1042"),
            state=DocumentState.FORWARDED,
            pdf=b"%PDF-1.4 a",
        )
    )
    store.add(
        PageRow(
            route="shop-a",
            row=audit_row(
                2,
                outcome=Outcome.FAILED,
                subject="<script>alert(1)</script>",
                filename='=HYPERLINK("x")',
            ),
            state=DocumentState.FAILED,
            last_answer="554 5.7.1 refused",
            attempts=(
                DeliveryAttempt(
                    attempted_at=T0 - timedelta(hours=1),
                    outcome=AttemptOutcome.RETRY,
                    answer="451 4.7.1 <b>greylisted</b>",
                    via="smtp",
                ),
                DeliveryAttempt(
                    attempted_at=T0,
                    outcome=AttemptOutcome.FAILED,
                    answer="554 5.7.1 refused",
                    via="smtp",
                ),
            ),
        )
    )
    store.add(
        PageRow(
            route="shop-b",
            row=audit_row(3, invoice_number="2001"),
            state=DocumentState.FAILED,
            last_answer="550 no",
        )
    )
    store.add(PageRow(route="shop-a", row=audit_row(4, outcome=Outcome.DUPLICATE, duplicate_of=3)))
    clock = Clock()
    if users is None:
        users = (
            WebUser(name="accountant", password="correct horse"),
            WebUser(name="shop-a", password="shop a pass", scope=RouteScope.of(["shop-a"])),
        )
    settings = WebSettings(
        users=users,
        secret_key=SECRET,
        public_url=PUBLIC if https else None,
        keep_pdfs=keep_pdfs,
        idle_seconds=600,
    )
    app = StatusPage(
        settings=settings,
        reader=store,
        admin=store,
        sessions=store,
        clock=clock.wall,
        monotonic=clock.monotonic,
    )
    client = TestClient(
        app.app, base_url=PUBLIC if https else "http://testserver", follow_redirects=False
    )
    return Page(client=client, store=store, clock=clock, app=app)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


def sign_in(
    page: Page, user: str = "accountant", password: str = "correct horse", **headers: str
) -> int:
    form = page.client.get("/login")
    response = page.client.post(
        "/login",
        data={"csrf": csrf_of(form.text), "user": user, "password": password},
        headers=headers,
    )
    return response.status_code


# --- signing in ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/audit", "/audit.csv", "/documents/1", "/documents/1/pdf"])
def test_every_page_asks_for_a_sign_in(path: str) -> None:
    page = make_page(keep_pdfs=True)
    response = page.client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


def test_a_wrong_password_is_refused_and_signs_nobody_in() -> None:
    page = make_page()
    assert sign_in(page, password="wrong") == 401
    assert page.store.sessions == {}
    assert page.client.get("/").status_code == 303


def test_the_right_password_opens_the_overview() -> None:
    page = make_page()
    assert sign_in(page) == 303
    response = page.client.get("/")
    assert response.status_code == 200
    assert "Route shop-a" in response.text and "Route shop-b" in response.text
    cookie = response.headers.get("set-cookie") or page.client.cookies.get(COOKIE)
    assert cookie


def test_the_session_cookie_is_httponly_and_strict_and_secure_under_https() -> None:
    page = make_page(https=True)
    form = page.client.get("/login")
    response = page.client.post(
        "/login",
        data={"csrf": csrf_of(form.text), "user": "accountant", "password": "correct horse"},
        headers={"origin": PUBLIC},
    )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie


def test_the_password_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    page = make_page()
    sign_in(page, password="hunter2-secret")
    assert "web_login_failed" in {getattr(r, "action", None) for r in caplog.records}
    assert "hunter2-secret" not in caplog.text


def test_logout_ends_the_session_on_the_server() -> None:
    page = make_page()
    sign_in(page)
    old_cookie = page.client.cookies.get(COOKIE)
    assert old_cookie
    csrf = csrf_of(page.client.get("/").text)
    assert page.client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert page.store.sessions == {}
    replay = TestClient(page.app.app, follow_redirects=False, cookies={COOKIE: old_cookie})
    assert replay.get("/").status_code == 303


def test_an_idle_session_expires() -> None:
    page = make_page()
    sign_in(page)
    page.clock.advance(599)
    assert page.client.get("/").status_code == 200
    page.clock.advance(601)
    assert page.client.get("/").status_code == 303


# --- CSRF and Origin ---------------------------------------------------------------------


@pytest.mark.parametrize("csrf", [None, "", "forged"])
def test_a_post_without_the_sessions_csrf_token_is_refused(csrf: str | None) -> None:
    page = make_page()
    sign_in(page)
    data = {} if csrf is None else {"csrf": csrf}
    response = page.client.post("/documents/2/retry", data=data)
    assert response.status_code == 403
    assert page.store.actions == []
    assert page.store.rows[2].state is DocumentState.FAILED


def test_a_login_without_the_forms_token_is_refused() -> None:
    page = make_page()
    response = page.client.post("/login", data={"user": "accountant", "password": "correct horse"})
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"origin": PUBLIC}, True),
        ({"origin": "https://evil.example"}, False),
        ({"origin": "http://relay.example.com"}, False),
        ({"referer": PUBLIC + "/documents/2"}, True),
        ({"referer": "https://relay.example.com.evil.example/"}, False),
        ({}, False),
    ],
)
def test_under_https_a_post_must_come_from_the_published_origin(
    headers: dict[str, str], allowed: bool
) -> None:
    page = make_page(https=True)
    assert sign_in(page, origin=PUBLIC) == 303
    csrf = csrf_of(page.client.get("/documents/2").text)
    response = page.client.post("/documents/2/retry", data={"csrf": csrf}, headers=headers)
    assert response.status_code == (303 if allowed else 403)


def test_retry_queues_a_failed_document_again() -> None:
    page = make_page()
    sign_in(page)
    csrf = csrf_of(page.client.get("/documents/2").text)
    response = page.client.post("/documents/2/retry", data={"csrf": csrf})
    assert response.status_code == 303
    assert page.store.rows[2].state is DocumentState.PENDING
    assert page.store.actions == [("retry", f"{2:064x}")]


# --- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/login", "/static/style.css", "/nowhere"])
@pytest.mark.parametrize("https", [False, True])
def test_every_answer_carries_the_security_headers(path: str, https: bool) -> None:
    page = make_page(https=https)
    response = page.client.get(path)
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert ("strict-transport-security" in response.headers) is https


@pytest.mark.parametrize("path", ["/livez", "/healthz", "/metrics"])
def test_the_probes_are_not_served_on_the_web_port(path: str) -> None:
    page = make_page()
    sign_in(page)
    assert page.client.get(path).status_code == 404


def test_the_page_works_on_a_phone_without_outside_assets() -> None:
    page = make_page()
    html = page.client.get("/login").text
    assert 'name="viewport"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


# --- throttling ------------------------------------------------------------------------


def test_failed_logins_slow_that_address_down() -> None:
    page = make_page()
    for _ in range(3):
        assert sign_in(page, password="wrong") == 401
    assert sign_in(page, password="wrong") == 401  # the 4th failure starts the wait
    assert sign_in(page) == 429  # even the right password waits
    page.clock.advance(1.5)
    assert sign_in(page) == 303


@pytest.mark.parametrize(
    ("failures", "waits"),
    [(1, 0.0), (3, 0.0), (4, 1.0), (5, 2.0), (6, 4.0), (12, 60.0)],
)
def test_the_throttle_doubles_its_wait_after_the_free_failures(failures: int, waits: float) -> None:
    throttle = LoginThrottle(free=3, base=1.0, cap=60.0)
    for _ in range(failures):
        throttle.failed("192.0.2.1", 100.0)
    assert throttle.wait_seconds("192.0.2.1", 100.0) == waits
    assert throttle.wait_seconds("192.0.2.2", 100.0) == 0.0
    throttle.succeeded("192.0.2.1")
    assert throttle.wait_seconds("192.0.2.1", 100.0) == 0.0


def test_the_throttle_forgets_the_oldest_addresses_first() -> None:
    throttle = LoginThrottle(free=0, max_addresses=2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        throttle.failed(address, 0.0)
    assert throttle.wait_seconds("192.0.2.1", 0.0) == 0.0
    assert throttle.wait_seconds("192.0.2.3", 0.0) > 0


# --- route scoping ---------------------------------------------------------------------


def test_a_user_of_one_route_gets_404_for_another_routes_document() -> None:
    page = make_page()
    assert sign_in(page, "shop-a", "shop a pass") == 303
    assert page.client.get("/documents/1").status_code == 200
    assert page.client.get("/documents/3").status_code == 404
    assert page.client.get("/documents/999").status_code == 404
    csrf = csrf_of(page.client.get("/documents/2").text)
    assert page.client.post("/documents/3/retry", data={"csrf": csrf}).status_code == 404
    assert page.store.rows[3].state is DocumentState.FAILED


def test_a_scoped_user_sees_only_its_routes_everywhere() -> None:
    page = make_page()
    sign_in(page, "shop-a", "shop a pass")
    overview = page.client.get("/").text
    assert "Route shop-a" in overview and "shop-b" not in overview
    audit = page.client.get("/audit").text
    assert "2001" not in audit and 'href="/documents/3"' not in audit  # row and link
    assert "4 row(s)" not in audit and "3 row(s)" in audit
    csv_text = page.client.get("/audit.csv").text
    assert "2001" not in csv_text
    assert len(csv_text.strip().splitlines()) == 1 + 3


# --- what strangers wrote --------------------------------------------------------------


def test_a_subject_holding_a_script_is_shown_as_text() -> None:
    page = make_page()
    sign_in(page)
    for path in ("/audit", "/documents/2"):
        html = page.client.get(path).text
        assert "<script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_documents_page_lists_its_attempts_with_times_and_escaped_answers() -> None:
    page = make_page()
    sign_in(page)
    html = page.client.get("/documents/2").text
    table = html[html.index('<table id="attempts">') : html.index("</table>")]
    rows = re.findall(r"<tr class=\"(\w+)\"><td>([^<]+)</td>", table)
    assert rows == [
        ("retry", (T0 - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("failed", T0.strftime("%Y-%m-%d %H:%M:%S UTC")),
    ]
    assert "451 4.7.1 &lt;b&gt;greylisted&lt;/b&gt;" in table
    assert "<b>" not in table
    assert "554 5.7.1 refused" in table
    # A document nobody tried yet says so, instead of an empty table.
    untried = page.client.get("/documents/1").text
    assert 'id="attempts"' not in untried and "No attempt recorded yet" in untried


@pytest.mark.parametrize(
    ("via", "delivery_id", "shown"),
    [
        (
            "smtp",
            "<out@relay>",
            'by mail (SMTP), delivery id <code id="delivery">&lt;out@relay&gt;</code>',
        ),
        ("getmyinvoices", "4711", 'to GetMyInvoices, delivery id <code id="delivery">4711</code>'),
        ("getmyinvoices", "", "(GetMyInvoices had it already)"),
    ],
)
def test_a_documents_page_says_where_it_was_delivered(
    via: str, delivery_id: str, shown: str
) -> None:
    page = make_page()
    page.store.add(
        PageRow(
            route="shop-a",
            row=audit_row(9),
            state=DocumentState.FORWARDED,
            forwarded_at=T0,
            delivered_via=via,
            delivery_id=delivery_id,
        )
    )
    sign_in(page)
    assert shown in page.client.get("/documents/9").text


def test_the_csv_export_neutralises_formulas_and_follows_the_search() -> None:
    page = make_page()
    sign_in(page)
    everything = page.client.get("/audit.csv")
    assert everything.headers["content-type"].startswith("text/csv")
    assert "attachment" in everything.headers["content-disposition"]
    assert "'=HYPERLINK" in everything.text
    assert ",=HYPERLINK" not in everything.text
    only = page.client.get("/audit.csv", params={"invoice": "1042"}).text
    assert len(only.strip().splitlines()) == 2


def test_search_by_invoice_number_and_paging() -> None:
    page = make_page()
    sign_in(page)
    html = page.client.get("/audit", params={"invoice": "2001"}).text
    assert "1 row(s)" in html and 'href="/documents/3"' in html


# --- PDFs ------------------------------------------------------------------------------


def test_the_pdf_is_an_attachment_and_only_with_keep_pdfs() -> None:
    page = make_page(keep_pdfs=True)
    sign_in(page)
    response = page.client.get("/documents/1/pdf")
    assert response.status_code == 200
    assert response.content == b"%PDF-1.4 a"
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert page.client.get("/documents/3/pdf").status_code == 404  # no bytes kept

    plain = make_page(keep_pdfs=False)
    sign_in(plain)
    assert plain.client.get("/documents/1/pdf").status_code == 404
    csrf = csrf_of(plain.client.get("/documents/1").text)
    assert plain.client.post("/documents/1/resend", data={"csrf": csrf}).status_code == 404
    assert plain.store.actions == []


def test_resend_queues_a_forwarded_document_with_kept_bytes() -> None:
    page = make_page(keep_pdfs=True)
    sign_in(page)
    csrf = csrf_of(page.client.get("/documents/1").text)
    assert page.client.post("/documents/1/resend", data={"csrf": csrf}).status_code == 303
    assert page.store.rows[1].state is DocumentState.PENDING


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("invoice.pdf", "attachment; filename=\"invoice.pdf\"; filename*=UTF-8''invoice.pdf"),
        (
            "Rechnung März.pdf",
            "attachment; filename=\"Rechnung M_rz.pdf\"; filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf",
        ),
        # line breaks become a space (worker.mail.text.clean_text), never a header break
        (
            'a"b\\c\r\n.pdf',
            "attachment; filename=\"a_b_c .pdf\"; filename*=UTF-8''a%22b%5Cc%20.pdf",
        ),
        ("", "attachment; filename=\"invoice.pdf\"; filename*=UTF-8''invoice.pdf"),
    ],
)
def test_content_disposition_follows_rfc_6266(filename: str, expected: str) -> None:
    assert content_disposition(filename) == expected
