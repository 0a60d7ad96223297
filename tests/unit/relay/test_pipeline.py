"""The pipeline against in-memory fakes of IMAP, SMTP, the PDF checker and the store.

The store's own rules (uniqueness by sha256 and content key, which rows an ERROR retry
replaces) are tested on SQL in tests/unit/store, and `store/test_contract.py` holds the
fake to them; the pipeline on a real store is tested in tests/integration."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox, FakeStore
from worker.errors import DeliveryDeferred, DeliveryRejected, MailboxError, SessionRefused
from worker.mail.verdicts import loop_reason, sender_allowed
from worker.models import AuditFilter, AuditRow, DedupMode, DocumentState, Outcome, PdfReport
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig

FORWARD_TO = "inbox-123@getmyinvoices.example"
FORWARD_FROM = "relay@shop.example"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Relay:
    """One relay under test: fakes of every outside system, and a way to poll."""

    def __init__(self, store: FakeStore, **config: object) -> None:
        self.mailbox = FakeMailbox()
        self.outbox = FakeOutbox()
        self.inspector = FakeInspector()
        self.store = store
        self.clock = Clock()
        self.stop = threading.Event()
        settings: dict[str, object] = {
            "mailbox": "invoices@imap.example/INBOX",
            "forward_to": FORWARD_TO,
            "forward_from": FORWARD_FROM,
            "dedup": DedupMode.BYTES,
        }
        settings.update(config)
        self.config = PipelineConfig(**settings)  # type: ignore[arg-type]

    def pipeline(self) -> Pipeline:
        return Pipeline(
            config=self.config,
            mailbox=self.mailbox,
            outbox=self.outbox,
            store=self.store,
            owner=poll_owner(self.store, self.config.mailbox),
            inspector=self.inspector,
            clock=self.clock,
            rng=random.Random(4),
            stop=self.stop,
        )

    def poll(self) -> None:
        self.pipeline().poll()

    def audit(self) -> list[AuditRow]:
        return sorted(self.store.audit(AuditFilter()), key=lambda row: row.id)

    def outcomes(self) -> list[tuple[int, str, str]]:
        return [(row.uid, row.filename or "", row.outcome.value) for row in self.audit()]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def relay(store: FakeStore) -> Relay:
    return Relay(store)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PDF_A = samples.invoice_pdf(number="1042")
PDF_B = samples.invoice_pdf(number="1043", amount="12.50")


def test_forwards_each_distinct_pdf_once_and_a_second_poll_sends_nothing(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_A)]))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_A)], subject="again"))
    relay.mailbox.add(
        samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_A), ("Invoice 1043.pdf", PDF_B)])
    )

    relay.poll()

    assert relay.outbox.sent_hashes() == [sha(PDF_A), sha(PDF_B)]
    attachment = next(relay.outbox.sent[0].iter_attachments())
    assert attachment.get_filename() == "Invoice 1042.pdf"
    assert attachment.get_content() == PDF_A
    rows = relay.audit()
    assert [(r.uid, r.outcome) for r in rows] == [
        (1, Outcome.FORWARDED),
        (2, Outcome.DUPLICATE),
        (3, Outcome.DUPLICATE),
        (3, Outcome.FORWARDED),
    ]
    assert rows[1].duplicate_of == rows[0].id
    assert rows[2].duplicate_of == rows[0].id
    assert rows[0].forwarded_message_id == str(relay.outbox.sent[0]["Message-ID"])
    assert rows[1].forwarded_at is None  # only the introducing row counts as a mail sent

    calls_before = len(relay.mailbox.calls)
    relay.poll()
    assert len(relay.outbox.sent) == 2
    # Nothing new: UIDNEXT decides it, the folder is not searched or fetched.
    assert relay.mailbox.calls[calls_before:] == ["open", "close"]
    assert len(relay.audit()) == 4


def test_each_kind_of_mail_gets_its_row(relay: Relay) -> None:
    relay.mailbox.add(samples.plain_mail())
    relay.mailbox.add(samples.image_only_mail())
    relay.mailbox.add(samples.mislabelled_mail())
    relay.mailbox.add(samples.unnamed_pdf_mail(PDF_A))
    relay.mailbox.add(samples.forwarded_mail(samples.invoice_mail(pdfs=[("b.pdf", PDF_B)])))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("cut.pdf", PDF_A[: len(PDF_A) // 2])]))

    relay.poll()

    rows = relay.audit()
    by_uid = {row.uid: row for row in rows}
    assert by_uid[1].outcome is Outcome.NO_PDF
    assert by_uid[2].outcome is Outcome.NO_PDF  # an image is not a PDF
    assert by_uid[3].outcome is Outcome.REJECTED
    assert "not a PDF" in (by_uid[3].reason or "")
    assert by_uid[4].outcome is Outcome.FORWARDED  # no name, found by its bytes
    assert by_uid[5].outcome is Outcome.FORWARDED  # inside an attached message
    assert by_uid[5].filename == "b.pdf"
    assert by_uid[6].outcome is Outcome.REJECTED
    assert sorted(relay.outbox.sent_hashes()) == sorted([sha(PDF_A), sha(PDF_B)])


def test_a_rejected_copy_never_blocks_a_later_accepted_one(relay: Relay) -> None:
    relay.inspector.check = samples_reject
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "rejected")]

    relay.inspector.check = FakeInspector().check
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "rejected"), (2, "a.pdf", "forwarded")]


def samples_reject(data: bytes) -> PdfReport:
    return PdfReport(accepted=False, reason="unparseable PDF: test")


@pytest.mark.parametrize(
    ("headers", "sender", "looped"),
    [
        ({"X-Invoice-Relay": "abc"}, "someone@else.example", True),
        ({"Auto-Submitted": "auto-generated"}, FORWARD_FROM, True),
        ({"Auto-Submitted": "auto-generated"}, "printout@designer.example", False),
        ({"Auto-Submitted": "no"}, FORWARD_FROM, False),
        ({}, FORWARD_FROM, False),
    ],
)
def test_loop_guard(relay: Relay, headers: dict[str, str], sender: str, looped: bool) -> None:
    relay.mailbox.add(
        samples.invoice_mail(pdfs=[("a.pdf", PDF_A)], sender=sender, extra_headers=headers)
    )
    relay.poll()
    row = relay.audit()[0]
    if looped:
        assert row.outcome is Outcome.REJECTED
        assert (row.reason or "").startswith("loop")
        assert relay.outbox.sent == []
    else:
        assert row.outcome is Outcome.FORWARDED


@pytest.mark.parametrize(
    ("address", "allowed", "expected"),
    [
        ("a@shop.example", (), True),
        ("a@shop.example", ("a@shop.example",), True),
        ("a@shop.example", ("@shop.example",), True),
        ("a@evil.example", ("@shop.example",), False),
        ("a@sub.shop.example", ("@shop.example",), False),
        ("", ("@shop.example",), False),
    ],
)
def test_sender_allowed(address: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert sender_allowed(address, allowed) is expected


def test_strangers_are_rejected_without_downloading_their_attachments(store: FakeStore) -> None:
    relay = Relay(store, allowed_senders=("@shop.example",))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("fake.pdf", PDF_A)], sender="x@evil.example"))
    relay.poll()
    assert relay.outcomes() == [(1, "fake.pdf", "rejected")]
    assert "sender not allowed" in (relay.audit()[0].reason or "")
    assert relay.mailbox.whole_fetches == []
    assert relay.outbox.sent == []


def test_loop_reason_names_the_rule() -> None:
    from worker.models import MailHeaders, MailSummary

    summary = MailSummary(
        uid=1, size=10, internaldate=None, headers=MailHeaders(relay_marker="x"), structure=None
    )
    assert loop_reason(summary, FORWARD_FROM) is not None


def test_a_refused_session_leaves_everything_pending_without_an_attempt(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A), ("b.pdf", PDF_B)]))
    relay.outbox.refuse_session = True
    with pytest.raises(SessionRefused):
        relay.poll()
    rows = relay.audit()
    assert [r.outcome for r in rows] == [Outcome.PENDING, Outcome.PENDING]
    assert [r.attempts for r in rows] == [0, 0]

    relay.outbox.refuse_session = False
    relay.poll()
    assert sorted(relay.outbox.sent_hashes()) == sorted([sha(PDF_A), sha(PDF_B)])


def test_temporary_refusal_retries_later_and_permanent_refusal_fails(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("b.pdf", PDF_B)]))
    relay.outbox.answers = [
        DeliveryDeferred("451 try again later", code=451),
        DeliveryRejected("550 5.7.1 message content rejected", code=550),
    ]
    relay.poll()
    rows = {row.filename: row for row in relay.audit()}
    assert rows["a.pdf"].outcome is Outcome.PENDING
    assert rows["a.pdf"].attempts == 1
    assert rows["b.pdf"].outcome is Outcome.FAILED
    assert "550 5.7.1" in (rows["b.pdf"].reason or "")

    relay.poll()  # the retry is not due yet
    assert relay.outbox.sent == []
    relay.clock.now += timedelta(minutes=5)
    relay.poll()
    assert relay.outbox.sent_hashes() == [sha(PDF_A)]
    assert {r.filename: r.outcome for r in relay.audit()} == {
        "a.pdf": Outcome.FORWARDED,
        "b.pdf": Outcome.FAILED,
    }


def test_out_of_attempts_becomes_failed(store: FakeStore) -> None:
    relay = Relay(store, max_attempts=2)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.outbox.answers = [DeliveryDeferred("451 later", code=451)] * 2
    relay.poll()
    relay.clock.now += timedelta(hours=1)
    relay.poll()
    row = relay.audit()[0]
    assert row.outcome is Outcome.FAILED
    assert row.attempts == 2


def test_a_crashed_pdf_check_is_an_error_and_is_retried(relay: Relay) -> None:
    relay.inspector.crash_on.add(PDF_A)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("b.pdf", PDF_B)]))
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "error"), (2, "b.pdf", "forwarded")]

    relay.inspector.crash_on.clear()
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "forwarded"), (2, "b.pdf", "forwarded")]


def test_a_mail_that_failed_as_a_whole_is_read_part_by_part_on_retry(relay: Relay) -> None:
    uid = relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A), ("b.pdf", PDF_B)]))
    relay.mailbox.unreadable.add(uid)
    relay.poll()
    assert relay.outcomes() == [(1, "", "error")]

    relay.mailbox.unreadable.clear()
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "forwarded"), (1, "b.pdf", "forwarded")]


def test_an_error_that_persists_becomes_rejected(store: FakeStore) -> None:
    relay = Relay(store, error_retries=2)
    relay.inspector.crash_on.add(PDF_A)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    for _ in range(4):
        relay.poll()
    row = relay.audit()[0]
    assert row.outcome is Outcome.REJECTED
    assert "gave up" in (row.reason or "")


def test_a_mailbox_failure_mid_poll_keeps_the_position(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.mailbox.fail_on.add("fetch_sections")
    with pytest.raises(MailboxError):
        relay.poll()
    assert relay.audit() == []
    position = relay.store.position(relay.config.mailbox)
    assert position is None or position.last_uid == 0

    relay.mailbox.fail_on.clear()
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "forwarded")]


def test_a_changed_uidvalidity_rescans_without_forwarding_again(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    relay.mailbox.uidvalidity += 1
    relay.poll()
    assert relay.outbox.sent_hashes() == [sha(PDF_A)]
    assert [r.outcome for r in relay.audit()] == [Outcome.FORWARDED, Outcome.DUPLICATE]


def test_since_leaves_older_mail_alone(store: FakeStore) -> None:
    relay = Relay(store, since=date(2026, 11, 10))
    relay.mailbox.add(
        samples.invoice_mail(pdfs=[("old.pdf", PDF_A)]),
        received=datetime(2026, 11, 1, tzinfo=UTC),
    )
    relay.mailbox.add(
        samples.invoice_mail(pdfs=[("new.pdf", PDF_B)]),
        received=datetime(2026, 11, 20, tzinfo=UTC),
    )
    relay.poll()
    assert relay.outcomes() == [(2, "new.pdf", "forwarded")]


def test_mail_over_the_size_limit_is_rejected_unread(store: FakeStore) -> None:
    relay = Relay(store, max_mail_bytes=1000)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    row = relay.audit()[0]
    assert row.outcome is Outcome.REJECTED
    assert "INVOICE_RELAY_MAX_MAIL_BYTES" in (row.reason or "")
    assert "fetch_sections" not in relay.mailbox.calls


def test_pdf_over_the_size_limit_is_rejected_unread(store: FakeStore) -> None:
    relay = Relay(store, max_pdf_bytes=1000)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    assert relay.outcomes() == [(1, "a.pdf", "rejected")]
    assert relay.mailbox.whole_fetches == []


def test_content_dedup_catches_a_re_render(store: FakeStore) -> None:
    relay = Relay(store, dedup=DedupMode.CONTENT)
    # The fake fingerprint ignores the first line, which holds the version here.
    first = b"%PDF-1.4\nsame pages\n%%EOF"
    second = b"%PDF-1.7\nsame pages\n%%EOF"
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", first)]))
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", second)]))
    relay.poll()
    rows = relay.audit()
    assert [r.outcome for r in rows] == [Outcome.FORWARDED, Outcome.DUPLICATE]
    assert "fingerprint" in (rows[1].reason or "")


def test_stop_takes_no_new_work(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.stop.set()
    relay.poll()
    assert relay.outbox.sent == []
    counts = relay.store.state_counts()
    assert counts.get(DocumentState.FORWARDED, 0) == 0


def test_dry_run_records_and_sends_nothing(relay: Relay) -> None:
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.mailbox.add(samples.plain_mail())
    relay.mailbox.add(samples.invoice_mail(pdfs=[("again.pdf", PDF_A)]))
    planned = relay.pipeline().plan()
    assert [(p.uid, p.kind.value, p.filename) for p in planned] == [
        (1, "document", "a.pdf"),
        (2, "no_pdf", None),
        (3, "duplicate", "again.pdf"),
    ]
    assert relay.audit() == []
    assert relay.outbox.sent == []


def test_an_error_mail_deleted_by_a_person_is_not_retried_forever(relay: Relay) -> None:
    relay.inspector.crash_on.add(PDF_A)
    uid = relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    assert relay.outcomes() == [(uid, "a.pdf", "error")]

    del relay.mailbox.mails[uid]  # a person deleted it between polls
    relay.poll()
    row = relay.audit()[0]
    assert row.outcome is Outcome.REJECTED
    assert "left the mailbox" in (row.reason or "")
    assert "PDF check failed" in (row.reason or "")  # the original reason is kept


def test_errors_under_an_old_uidvalidity_do_not_linger(relay: Relay) -> None:
    relay.inspector.crash_on.add(PDF_A)
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    relay.inspector.crash_on.clear()
    relay.mailbox.uidvalidity += 1
    relay.poll()
    rows = relay.audit()
    assert [(r.uidvalidity, r.outcome) for r in rows] == [
        (1000, Outcome.REJECTED),
        (1001, Outcome.FORWARDED),
    ]
    assert "UIDVALIDITY changed" in (rows[0].reason or "")


class VanishingMailbox(FakeMailbox):
    """A person deletes each mail after its structure was read, before its PDF is."""

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        if max_bytes is None:
            for uid in wanted:
                self.mails.pop(uid, None)
        return super().fetch_sections(wanted, max_bytes=max_bytes)


def test_a_mail_deleted_during_a_poll_is_recorded_not_lost(relay: Relay) -> None:
    relay.mailbox = VanishingMailbox()
    relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.poll()
    # Recorded as an error, retried at the end of the poll, found gone for good.
    assert relay.outcomes() == [(1, "a.pdf", "rejected")]
    reason = relay.audit()[0].reason or ""
    assert "vanished" in reason
    assert "left the mailbox" in reason
    assert relay.outbox.sent == []


def test_an_unreadable_structure_is_rejected_at_once(relay: Relay) -> None:
    uid = relay.mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.mailbox.hostile_structure.add(uid)
    relay.poll()
    row = relay.audit()[0]
    assert row.outcome is Outcome.REJECTED
    assert "nested more than 40 levels" in (row.reason or "")
    assert relay.mailbox.whole_fetches == []
