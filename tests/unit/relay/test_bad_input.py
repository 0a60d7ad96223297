"""Guarantee 4, bad input never stops a poll: whatever one mail makes a library (or our
own code) raise becomes that mail's row, and the poll goes on with the next mail.

Each hostile case here stopped every poll before: the exception escaped the per-mail
guard, the position never moved past the mail, and the next poll met it again.
"""

from __future__ import annotations

import base64
import io
import random
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import ClassVar

import pytest
from pypdf.errors import PdfReadError
from pypdf.generic import ArrayObject

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox
from tests.signing import KeyServer, sign, signing_key
from worker.errors import PdfCheckFailed
from worker.mail.trust import DkimVerifier, TrustPolicy
from worker.mail.verdicts import VANISHED_REASON, checked_part
from worker.models import (
    AuditFilter,
    AuditRow,
    DedupMode,
    MailSummary,
    Outcome,
    PdfReport,
    ProblemKind,
    SightingKind,
)
from worker.pdf.content import our_bug
from worker.pdf.inspection import inspect_pdf
from worker.pdf.pool import PdfInspector
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.store.notices import SqlNoticeLog
from worker.store.sqlstore import SqlStore

SHOP = signing_key("shop.example")
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
DKIM_ON = TrustPolicy(require_dkim=True)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

# A SubjectPublicKeyInfo whose AlgorithmIdentifier holds a NULL with content: dkimpy's
# ASN.1 parser `assert`s a NULL is empty, and nothing in dkimpy catches AssertionError.
HOSTILE_SPKI = bytes([0x30, 0x0A, 0x30, 0x05, 0x06, 0x01, 0x2A, 0x05, 0x01, 0x00, 0x03, 0x01, 0x00])
HOSTILE_KEY = b"v=DKIM1; k=rsa; p=" + base64.b64encode(HOSTILE_SPKI)


class BrokenResolver(KeyServer):
    """A DNS answer the resolver library chokes on: the lookup itself raises."""

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.asked.append(name)
        raise RuntimeError("resolver fell over on a hostile answer")


def shop_mail(subject: str = "Invoice 1042") -> bytes:
    return samples.invoice_mail(
        pdfs=[("Invoice 1042.pdf", PDF)],
        sender="Printout Designer <invoices@shop.example>",
        subject=subject,
    )


def hostile_keys() -> KeyServer:
    keys = KeyServer()
    keys.records[SHOP.dns_name] = HOSTILE_KEY
    return keys


def poll(
    store: SqlStore,
    mailbox: FakeMailbox,
    keys: KeyServer,
    **config: object,
) -> tuple[FakeOutbox, list[AuditRow]]:
    outbox = FakeOutbox()
    settings: dict[str, object] = {
        "mailbox": "invoices@imap.example/INBOX",
        "forward_to": "inbox@getmyinvoices.example",
        "forward_from": "relay@shop.example",
        "dedup": DedupMode.BYTES,
        **config,
    }
    Pipeline(
        config=PipelineConfig(**settings),  # type: ignore[arg-type]
        mailbox=mailbox,
        outbox=outbox,
        store=store,
        owner=poll_owner(store, str(settings["mailbox"])),
        inspector=FakeInspector(),
        clock=lambda: NOW,
        rng=random.Random(1),
        stop=threading.Event(),
        txt_lookup=keys,
    ).poll()
    return outbox, sorted(store.audit(AuditFilter()), key=lambda row: row.id)


# --- DKIM: the key comes from DNS that the sender controls ------------------------------


def test_the_hostile_key_does_make_dkimpy_raise() -> None:
    """The premise of the next tests: this key escapes dkimpy and the verifier's own
    list of expected errors, so only the per-mail guard stands between it and the poll."""
    with pytest.raises(AssertionError):
        DkimVerifier(lookup=hostile_keys()).verify(
            sign(shop_mail(), SHOP), from_domain="shop.example", policy=DKIM_ON
        )


@pytest.mark.parametrize(
    ("keys", "raised"),
    [(hostile_keys(), "AssertionError"), (BrokenResolver(), "RuntimeError")],
    ids=["hostile key record", "resolver raising"],
)
def test_a_dkim_check_that_raises_makes_that_mail_an_error_and_the_poll_goes_on(
    store: SqlStore, keys: KeyServer, raised: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox = FakeMailbox()
    hostile = mailbox.add(sign(shop_mail(), SHOP))
    later = mailbox.add(samples.plain_mail())
    _, rows = poll(store, mailbox, keys, trust=DKIM_ON)
    by_uid = {row.uid: row for row in rows}
    assert by_uid[hostile].outcome is Outcome.ERROR
    assert (by_uid[hostile].reason or "").startswith(f"sender proof crashed: {raised}")
    assert by_uid[later].outcome is Outcome.NO_PDF  # the poll went on past it
    assert store.position("invoices@imap.example/INBOX").last_uid == later  # type: ignore[union-attr]
    # Logged with its traceback, under the per-mail guard's action (twice: a poll
    # retries its `error` rows once before it ends).
    logged = [r for r in caplog.records if getattr(r, "action", None) == "mail_error"]
    assert logged
    assert all(r.exc_info is not None and getattr(r, "uid", None) == hostile for r in logged)
    # The PDF of a mail whose sender is unproven was never downloaded.
    assert mailbox.whole_fetches == []


def test_a_mail_whose_dkim_check_raised_is_tried_again_and_forwarded_once_dns_is_sane(
    store: SqlStore,
) -> None:
    mailbox = FakeMailbox()
    uid = mailbox.add(sign(shop_mail(), SHOP))
    poll(store, mailbox, hostile_keys(), trust=DKIM_ON)
    outbox, rows = poll(store, mailbox, KeyServer().publish(SHOP), trust=DKIM_ON)
    assert [(row.uid, row.outcome) for row in rows] == [(uid, Outcome.FORWARDED)]
    assert len(outbox.sent) == 1


def test_a_dkim_check_that_raises_on_every_poll_ends_rejected_after_the_retries(
    store: SqlStore,
) -> None:
    mailbox = FakeMailbox()
    mailbox.add(sign(shop_mail(), SHOP))
    _, rows = poll(store, mailbox, hostile_keys(), trust=DKIM_ON)
    assert [row.outcome for row in rows] == [Outcome.ERROR]
    for _ in range(3):  # each poll tries twice (intake, retry); error_retries is 3
        _, rows = poll(store, mailbox, hostile_keys(), trust=DKIM_ON)
    assert [row.outcome for row in rows] == [Outcome.REJECTED]
    assert "AssertionError" in (rows[0].reason or "")


# --- a UID that SEARCH listed and FETCH no longer described -----------------------------


class ExpungingMailbox(FakeMailbox):
    """Another client expunges `doomed` between the relay's SEARCH and its FETCH."""

    def __init__(self) -> None:
        super().__init__()
        self.doomed: set[int] = set()
        self.summarised: list[int] = []

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        for uid in self.doomed & set(uids):
            del self.mails[uid]
        self.summarised.extend(uids)
        return super().summaries(uids)


def test_a_mail_expunged_between_search_and_fetch_gets_a_final_row(store: SqlStore) -> None:
    mailbox = ExpungingMailbox()
    first = mailbox.add(shop_mail())
    gone = mailbox.add(shop_mail("Invoice 1043"))
    last = mailbox.add(samples.plain_mail())
    mailbox.doomed.add(gone)
    outbox, rows = poll(store, mailbox, KeyServer())
    assert [(row.uid, row.outcome, row.reason) for row in rows] == [
        (first, Outcome.FORWARDED, None),
        (gone, Outcome.REJECTED, VANISHED_REASON),
        (last, Outcome.NO_PDF, None),
    ]
    assert len(outbox.sent) == 1
    # Final: the next poll does not ask for it again, and its row stays as it is.
    mailbox.summarised.clear()
    _, again = poll(store, mailbox, KeyServer())
    assert gone not in mailbox.summarised
    assert again == rows


def test_a_vanished_mail_is_not_in_a_failure_notice(store: SqlStore) -> None:
    mailbox = ExpungingMailbox()
    mailbox.doomed.add(mailbox.add(shop_mail()))
    stranger = mailbox.add(samples.invoice_mail(pdfs=[("x.pdf", b"not a pdf")]))
    poll(store, mailbox, KeyServer())
    problems = SqlNoticeLog(store.engine).unnotified("invoices@imap.example/INBOX", limit=100)
    # The rejected attachment is reported; the mail a person removed is not.
    assert [(p.kind, p.reason) for p in problems] == [
        (
            ProblemKind.REJECTED,
            next(r.reason for r in store.audit(AuditFilter()) if r.uid == stranger),
        )
    ]


def test_a_mail_vanished_before_its_error_is_retried_keeps_the_abandoned_reason(
    store: SqlStore,
) -> None:
    """The retry of an `error` mail that a person removed meanwhile: its error rows
    become `rejected` saying so (one "vanished" row beside them would leave them `error`)."""
    mailbox = ExpungingMailbox()
    uid = mailbox.add(sign(shop_mail(), SHOP))
    poll(store, mailbox, hostile_keys(), trust=DKIM_ON)
    mailbox.doomed.add(uid)
    _, rows = poll(store, mailbox, hostile_keys(), trust=DKIM_ON)
    assert [(row.uid, row.outcome) for row in rows] == [(uid, Outcome.REJECTED)]
    assert "left the mailbox" in (rows[0].reason or "")


# --- the PDF check: a bug of ours is not the file's fault --------------------------------


def _ours() -> None:
    raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")


def _pypdf_type_error() -> None:
    ArrayObject([1]).write_to_stream(io.BytesIO())  # pypdf calls .write_to_stream on 1


def _pypdf_read_error() -> None:
    raise PdfReadError("EOF marker not found")


def _our_value_error() -> None:
    float("/NotANumber")  # a hostile value converted by our code: the file's fault


@pytest.mark.parametrize(
    ("raise_it", "expected"),
    [
        (_ours, True),
        (_pypdf_type_error, False),
        (_pypdf_read_error, False),
        (_our_value_error, False),
    ],
    ids=["our TypeError", "TypeError inside pypdf", "pypdf's own error", "our ValueError"],
)
def test_our_bug_tells_our_mistakes_from_pypdf_failing(raise_it: object, expected: bool) -> None:
    try:
        raise_it()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - what is raised is the case under test
        assert our_bug(exc) is expected
    else:
        pytest.fail("nothing raised")


class _BuggyPattern:
    """Stands in for the invoice number pattern (it is a parameter of the check) with a
    mistake of the kind our code could make: a TypeError raised outside pypdf."""

    groupindex: ClassVar[dict[str, int]] = {}
    groups = 0

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        del text
        return len(None)  # type: ignore[arg-type,return-value]


def buggy_check(data: bytes) -> PdfReport:
    return inspect_pdf(data, invoice_pattern=_BuggyPattern())  # type: ignore[arg-type]


def test_a_bug_in_the_check_raises_instead_of_rejecting_the_file() -> None:
    invoice = samples.invoice_pdf()
    assert inspect_pdf(invoice).accepted  # the file itself is fine
    with pytest.raises(TypeError):
        buggy_check(invoice)


def test_a_bug_in_the_check_makes_the_sighting_an_error_to_retry() -> None:
    invoice = samples.invoice_pdf()
    with PdfInspector(workers=1, check=buggy_check) as inspector:
        [result] = inspector.inspect_many([invoice])
    assert isinstance(result, PdfCheckFailed)
    part = checked_part("2", "invoice.pdf", invoice, result)
    assert part.kind is SightingKind.ERROR
    assert "TypeError" in (part.reason or "")
