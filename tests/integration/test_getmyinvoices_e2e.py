"""End to end with Dovecot and `invoice-relay once` delivering to the fake GetMyInvoices
API: each distinct invoice uploaded once (type, number, name), a SIGKILL-like crash
between the upload and its mark (one copy, found by /documents/exists), a wrong key."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import samples
from tests.integration.guarantee_tools import (
    invoices,
    relay_command,
    run_once,
    run_until_done,
    sql_rows,
)
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.getmyinvoices import UNAVAILABLE, Answer, FakeGetMyInvoices
from tests.servers.smtp_sink import SmtpSink
from worker.faults import CRASH_EXIT_STATUS

KEY = "e2e-key-9911"


@pytest.fixture
def api() -> Iterator[FakeGetMyInvoices]:
    with FakeGetMyInvoices(api_key=KEY) as fake:
        yield fake
    assert fake.problems() == []


def _env(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, url: str, **extra: str
) -> dict[str, str]:
    env = relay_env(imap, smtp, url)
    for name in ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "FORWARD_TO", "FORWARD_FROM"):
        env.pop(f"INVOICE_RELAY_{name}", None)  # the API needs no SMTP
    env.update(
        INVOICE_RELAY_DELIVERY="getmyinvoices",
        INVOICE_RELAY_GMI_API_KEY=KEY,
        INVOICE_RELAY_GMI_API_URL=api.url,
        # As the sample invoices print it ("Invoice No. 8100"); the default would also
        # read "Rechnung 8100" in a credit note's lines.
        INVOICE_RELAY_INVOICE_NUMBER_PATTERN=r"Invoice No\. (\d+)",
        **extra,
    )
    return env


def test_a_backfill_through_the_api(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    batch = invoices(4, first=8100)
    credit = samples.invoice_mail(
        pdfs=[("Gutschrift 8200.pdf", samples.invoice_pdf(number="8200", logo=False))],
        subject="Gutschrift 8200",
        message_id="<credit-8200@shop.example>",
    )
    # Named and sent like an invoice: only its first page says what it is.
    quiet_credit = samples.invoice_mail(
        pdfs=[
            (
                "Document 8201.pdf",
                samples.invoice_pdf(
                    number="8201", lines=[("Storno zu Rechnung 8100", "-10.00")], logo=False
                ),
            )
        ],
        subject="Your document 8201",
        message_id="<credit-8201@shop.example>",
    )
    # Two invoices in one file: which number is the document's cannot be told.
    two_in_one = samples.invoice_mail(
        pdfs=[
            (
                "Invoices 8300 and 8301.pdf",
                samples.joined_pdf(
                    samples.invoice_pdf(number="8300", logo=False),
                    samples.invoice_pdf(number="8301", logo=False),
                ),
            )
        ],
        subject="Your invoices",
        message_id="<two-8300@shop.example>",
    )
    imap.append_many([*(i.mail for i in batch), batch[0].mail, credit, quiet_credit, two_in_one])
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    result = run_once(_env(imap, smtp, api, url))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(api.uploads()) == 7 and len(api.documents) == 7  # the repeat is not uploaded
    assert {d.sha256 for d in api.documents} >= {i.sha256 for i in batch}
    sent = {d.request["fileName"]: d.request for d in api.documents}
    kinds = {name: request["documentType"] for name, request in sent.items()}
    assert kinds["Gutschrift 8200.pdf"] == "CREDIT_NOTE"
    assert kinds["Document 8201.pdf"] == "CREDIT_NOTE"
    assert kinds["Invoice 8100.pdf"] == "SALES_INVOICE"
    # Each named as its attachment, numbered as its first page says.
    numbers = {name: request.get("documentNumber") for name, request in sent.items()}
    assert all(numbers[f"Invoice {i.number}.pdf"] == i.number for i in batch)
    assert (numbers["Gutschrift 8200.pdf"], numbers["Document 8201.pdf"]) == ("8200", "8201")
    assert numbers["Invoices 8300 and 8301.pdf"] is None
    assert "several invoice numbers" in sent["Invoices 8300 and 8301.pdf"]["note"]
    rows = sql_rows(url, "SELECT outcome, delivered_via, delivery_id FROM audit_log")
    forwarded = [r for r in rows if r["outcome"] == "forwarded"]
    assert len(forwarded) == 7
    assert {r["delivery_id"] for r in forwarded} == {str(d.uid) for d in api.documents}
    assert {r["delivered_via"] for r in forwarded} == {"getmyinvoices"}
    assert smtp.messages == []


def test_a_crash_between_upload_and_mark_leaves_one_copy(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    api.detect_duplicates = False  # only the relay's /documents/exists check prevents a copy
    batch = invoices(3, first=8300)
    imap.append_many(i.mail for i in batch)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = _env(
        imap,
        smtp,
        api,
        url,
        INVOICE_RELAY_TEST_CRASH_AT="after_send:2",
    )
    crashed = run_once(env)
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr[-2000:]
    del env["INVOICE_RELAY_TEST_CRASH_AT"]
    run_until_done(env, url)
    copies = {i.sha256: sum(d.sha256 == i.sha256 for d in api.documents) for i in batch}
    assert copies == {i.sha256: 1 for i in batch}
    assert sum(c.path.endswith("/documents/exists") for c in api.calls) == 1


def test_a_lost_answer_leaves_one_copy(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    api.detect_duplicates = False  # only the relay's /documents/exists check prevents a copy
    api.drop_after_store = 1  # the first upload is filed, and its answer never comes
    batch = invoices(2, first=8500)
    imap.append_many(i.mail for i in batch)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    # The lost answer is an attempt, retried after INVOICE_RELAY_RETRY_DELAY (a minute by
    # default); what is under test is what the retry asks first, not how long it waits.
    run_until_done(_env(imap, smtp, api, url, INVOICE_RELAY_RETRY_DELAY="0.5s"), url)
    copies = {i.sha256: api.copies(i.sha256) for i in batch}
    assert copies == {i.sha256: 1 for i in batch}
    assert len(api.uploads()) == 2  # one per invoice: the lost one was not sent again
    assert sum(c.path.endswith("/documents/exists") for c in api.calls) == 1


def test_a_burst_of_503_waits_uncounted_and_sends_each_once(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    # "Please retry in a few minutes": the fake says how many seconds in Retry-After,
    # which the relay obeys, so that the burst passes within the test.
    busy = Answer(status=UNAVAILABLE.status, body=UNAVAILABLE.body, headers={"Retry-After": "1"})
    api.faults.extend([busy] * 3)
    batch = invoices(3, first=8600)
    imap.append_many(i.mail for i in batch)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    runs = run_until_done(_env(imap, smtp, api, url), url)
    assert len(runs) > 1  # the burst held every document at least once
    assert {i.sha256: api.copies(i.sha256) for i in batch} == {i.sha256: 1 for i in batch}
    assert len(api.uploads()) == 3 + 3  # each invoice once, and the three refused tries
    rows = sql_rows(url, "SELECT outcome, attempts FROM audit_log")
    assert rows == [{"outcome": "forwarded", "attempts": 1}] * 3  # no 503 counted


def test_a_wrong_key_exits_1_naming_the_cause(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    imap.append_many(i.mail for i in invoices(1, first=8400))
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = _env(imap, smtp, api, url)
    env["INVOICE_RELAY_GMI_API_KEY"] = "wrong-key-0000"
    result = run_once(env)
    assert result.returncode == 1
    assert "the API key is unknown" in result.stderr
    assert "wrong-key-0000" not in result.stderr + result.stdout
    api.calls.clear()  # the fake saw the wrong key: not a request-schema problem of ours
    # Dedup is per destination, and an API route's is its account: without a named
    # `destination` nothing is recorded until the API says which account the key opens.
    # The mail waits in the mailbox; the right key records and delivers it.
    assert sql_rows(url, "SELECT outcome FROM audit_log") == []
    env["INVOICE_RELAY_GMI_API_KEY"] = KEY
    assert run_once(env).returncode == 0
    rows = sql_rows(url, "SELECT outcome, destination FROM audit_log")
    assert rows == [{"outcome": "forwarded", "destination": "getmyinvoices:G-20707-0"}]


def test_check_asks_for_the_account(
    imap: DovecotServer, smtp: SmtpSink, api: FakeGetMyInvoices, tmp_path: Path
) -> None:
    env = _env(imap, smtp, api, f"sqlite:///{tmp_path / 'relay.db'}")
    result = subprocess.run(
        relay_command("check"), env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "ok   getmyinvoices: the API key works for account G-20707-0" in result.stdout
    assert "smtp" not in result.stdout  # no SMTP is needed without notices
    assert [c.path for c in api.calls] == ["/accounts/v3/account"]
