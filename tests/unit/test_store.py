"""SqlStore against SQLite (a file) and PostgreSQL (a throw-away database, `integration`)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.servers.postgres import postgres_server, temporary_database
from worker.errors import StoreError
from worker.models import (
    AuditFilter,
    DedupMode,
    DocumentState,
    MailHeaders,
    MailRecord,
    Outcome,
    PartRecord,
    RecordedSighting,
    SightingKind,
)
from worker.store.engine import create_schema, make_engine
from worker.store.schema import document_contents, sightings
from worker.store.sqlstore import SqlStore

MAILBOX = "relay@example.test/INBOX"
UIDVALIDITY = 7
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

StoreFactory = Callable[[], SqlStore]


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores (own engines) on one fresh database with the current schema."""
    if request.param == "sqlite":
        context = None
        url = f"sqlite:///{tmp_path / 'relay.db'}"
    else:
        base_url = request.getfixturevalue("postgres_base_url")
        context = temporary_database(base_url)
        url = context.__enter__()
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    opened: list[SqlStore] = []

    def open_store() -> SqlStore:
        opened.append(SqlStore(url))
        return opened[-1]

    try:
        yield open_store
    finally:
        for each in opened:
            each.close()
        if context is not None:
            context.__exit__(None, None, None)


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


def pdf(text: str) -> bytes:
    return f"%PDF-1.4 {text}".encode()


def accepted(
    content: bytes,
    *,
    part: str = "2",
    fingerprint: str | None = None,
    invoice_number: str | None = None,
    filename: str | None = "invoice.pdf",
) -> PartRecord:
    return PartRecord(
        part=part,
        kind=SightingKind.DOCUMENT,
        filename=filename,
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        fingerprint=fingerprint,
        invoice_number=invoice_number,
        content=content,
    )


def mail(uid: int, *parts: PartRecord, subject: str = "Invoice") -> MailRecord:
    headers = MailHeaders(
        message_id=f"<{uid}@shop.example>",
        sender="Shop <shop@example.test>",
        sender_address="shop@example.test",
        subject=subject,
        date=datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    return MailRecord(uid=uid, headers=headers, parts=parts)


def record(
    store: SqlStore,
    *mails: MailRecord,
    dedup: DedupMode = DedupMode.CONTENT,
    advance_to: int | None = None,
    now: datetime = T0,
) -> list[RecordedSighting]:
    return list(
        store.record_mails(
            mailbox=MAILBOX,
            uidvalidity=UIDVALIDITY,
            mails=mails,
            advance_to=advance_to,
            dedup=dedup,
            keep_pdfs=False,
            now=now,
        )
    )


def sighting_tries(store: SqlStore, sighting_id: int) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sightings.c.tries).where(sightings.c.id == sighting_id)
            ).scalar_one()
        )


def document_content(store: SqlStore, document_id: int) -> bytes | None:
    with store.engine.connect() as connection:
        value = connection.execute(
            sa.select(document_contents.c.content).where(
                document_contents.c.document_id == document_id
            )
        ).scalar_one_or_none()
        return None if value is None else bytes(value)


# --- claiming and duplicates -----------------------------------------------------------


def test_a_new_pdf_claims_a_pending_document(store: SqlStore) -> None:
    (first,) = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=[mail(1, accepted(pdf("a")))],
        advance_to=1,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=T0,
    )
    assert first.kind is SightingKind.DOCUMENT
    assert first.inserted
    assert first.document_id is not None
    assert first.duplicate_of is None
    assert store.state_counts() == {
        DocumentState.PENDING: 1,
        DocumentState.FORWARDED: 0,
        DocumentState.FAILED: 0,
    }
    assert document_content(store, first.document_id) == pdf("a")


@pytest.mark.parametrize("dedup", list(DedupMode))
def test_the_same_bytes_are_a_duplicate_in_either_mode(store: SqlStore, dedup: DedupMode) -> None:
    first, second = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=[mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("a")))],
        advance_to=2,
        dedup=dedup,
        keep_pdfs=False,
        now=T0,
    )
    assert second.kind is SightingKind.DUPLICATE
    assert second.reason == f"same sha256 as sighting {first.sighting_id}"
    assert second.duplicate_of == first.sighting_id
    assert second.document_id == first.document_id
    assert store.state_counts()[DocumentState.PENDING] == 1


@pytest.mark.parametrize(
    ("dedup", "expected"),
    [
        (DedupMode.CONTENT, SightingKind.DUPLICATE),
        (DedupMode.BYTES, SightingKind.DOCUMENT),
    ],
)
def test_the_same_fingerprint_is_a_duplicate_only_in_content_mode(
    store: SqlStore, dedup: DedupMode, expected: SightingKind
) -> None:
    first, second = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=[
            mail(1, accepted(pdf("a, printed Monday"), fingerprint="fp1:same")),
            mail(2, accepted(pdf("a, printed Tuesday"), fingerprint="fp1:same")),
        ],
        advance_to=2,
        dedup=dedup,
        keep_pdfs=False,
        now=T0,
    )
    assert first.kind is SightingKind.DOCUMENT
    assert second.kind is expected
    if expected is SightingKind.DUPLICATE:
        assert second.reason == f"same content fingerprint as sighting {first.sighting_id}"
        assert second.duplicate_of == first.sighting_id
    else:
        assert second.document_id != first.document_id


def test_a_rejected_copy_never_blocks_a_later_accepted_one(store: SqlStore) -> None:
    content = pdf("a")
    rejected = PartRecord(
        part="2",
        kind=SightingKind.REJECTED,
        reason="sender not allowed",
        sha256=hashlib.sha256(content).hexdigest(),
        fingerprint="fp1:x",
    )
    first, second = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=[mail(1, rejected), mail(2, accepted(content, fingerprint="fp1:x"))],
        advance_to=2,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=T0,
    )
    assert first.kind is SightingKind.REJECTED
    assert first.document_id is None
    assert second.kind is SightingKind.DOCUMENT


def test_a_replay_adds_no_second_sighting(store: SqlStore) -> None:
    batch = [
        mail(1, accepted(pdf("a"))),
        mail(2, accepted(pdf("a"))),
        mail(3, PartRecord(part="", kind=SightingKind.NO_PDF)),
    ]

    first_run = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=batch,
        advance_to=3,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=T0,
    )
    replay = store.record_mails(
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=batch,
        advance_to=3,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=T0 + timedelta(minutes=5),
    )
    assert [r.inserted for r in first_run] == [True, True, True]
    assert [r.inserted for r in replay] == [False, False, False]
    for before, after in zip(first_run, replay, strict=True):
        assert (after.sighting_id, after.kind, after.reason, after.document_id) == (
            before.sighting_id,
            before.kind,
            before.reason,
            before.document_id,
        )
        assert after.duplicate_of == before.duplicate_of
    assert [r.kind for r in replay] == [
        SightingKind.DOCUMENT,
        SightingKind.DUPLICATE,
        SightingKind.NO_PDF,
    ]
    assert len(store.audit(AuditFilter())) == 3
    assert store.state_counts()[DocumentState.PENDING] == 1


def test_an_error_sighting_is_replaced_on_retry(store: SqlStore) -> None:
    def attempt(part: PartRecord, now: datetime) -> RecordedSighting:
        (result,) = record(store, mail(4, part), advance_to=4, now=now)
        return result

    error = PartRecord(part="2", kind=SightingKind.ERROR, reason="PDF check timed out")
    first = attempt(error, T0)
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, max_tries=2) == [4]
    assert attempt(error, T0 + timedelta(minutes=5)).inserted
    assert sighting_tries(store, first.sighting_id) == 2
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, max_tries=2) == []
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, max_tries=3) == [4]

    fixed = attempt(accepted(pdf("a")), T0 + timedelta(minutes=10))
    assert fixed.inserted
    assert fixed.sighting_id == first.sighting_id
    assert fixed.kind is SightingKind.DOCUMENT
    (row,) = store.audit(AuditFilter())
    assert row.outcome is Outcome.PENDING
    assert row.received_at == T0  # first seen, not last tried
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, max_tries=9) == []


def test_exhausted_errors_become_rejected(store: SqlStore) -> None:
    error = PartRecord(part="2", kind=SightingKind.ERROR, reason="worker crashed")
    for minutes in (0, 5, 10):
        store.record_mails(
            mailbox=MAILBOX,
            uidvalidity=UIDVALIDITY,
            mails=[mail(5, error), mail(6, PartRecord(part="3", kind=SightingKind.ERROR))]
            if minutes == 0
            else [mail(5, error)],
            advance_to=6,
            dedup=DedupMode.CONTENT,
            keep_pdfs=False,
            now=T0 + timedelta(minutes=minutes),
        )
    assert store.reject_exhausted_errors(mailbox=MAILBOX, max_tries=3) == 1
    rows = {row.uid: row for row in store.audit(AuditFilter())}
    assert rows[5].outcome is Outcome.REJECTED
    assert rows[5].reason == "gave up after 3 tries: worker crashed"
    assert rows[6].outcome is Outcome.ERROR
    assert store.reject_exhausted_errors(mailbox=MAILBOX, max_tries=3) == 0


# --- position --------------------------------------------------------------------------


def test_the_position_never_moves_backwards(store: SqlStore) -> None:
    assert store.position(MAILBOX) is None

    def advance(to: int | None, uidvalidity: int = UIDVALIDITY) -> None:
        store.record_mails(
            mailbox=MAILBOX,
            uidvalidity=uidvalidity,
            mails=[],
            advance_to=to,
            dedup=DedupMode.CONTENT,
            keep_pdfs=False,
            now=T0,
        )

    advance(10)
    advance(5)
    advance(None)
    position = store.position(MAILBOX)
    assert position is not None
    assert (position.uidvalidity, position.last_uid) == (UIDVALIDITY, 10)
    advance(12)
    position = store.position(MAILBOX)
    assert position is not None
    assert position.last_uid == 12

    store.reset_position(MAILBOX, 99)
    position = store.position(MAILBOX)
    assert position is not None
    assert (position.uidvalidity, position.last_uid) == (99, 0)
    advance(3, uidvalidity=99)
    position = store.position(MAILBOX)
    assert position is not None
    assert (position.uidvalidity, position.last_uid) == (99, 3)


# --- sending ---------------------------------------------------------------------------


def test_claim_due_leases_until_the_lease_expires(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    claimed = store.claim_due(now=T0, limit=10, lease_seconds=60)
    assert [c.content for c in claimed] == [pdf("a"), pdf("b")]
    assert store.claim_due(now=T0 + timedelta(seconds=59), limit=10, lease_seconds=60) == []
    again = store.claim_due(now=T0 + timedelta(seconds=61), limit=1, lease_seconds=60)
    assert [c.document_id for c in again] == [claimed[0].document_id]

    store.release(claimed[1].document_id)
    released = store.claim_due(now=T0 + timedelta(seconds=62), limit=10, lease_seconds=60)
    assert [c.document_id for c in released] == [claimed[1].document_id]


def test_claim_due_waits_for_the_next_attempt(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))))
    (claimed,) = store.claim_due(now=T0, limit=10, lease_seconds=60)
    store.mark_retry(
        claimed.document_id,
        answer="451 try later",
        next_attempt_at=T0 + timedelta(minutes=10),
        failed=False,
    )
    assert store.claim_due(now=T0 + timedelta(minutes=9), limit=10, lease_seconds=60) == []
    (retried,) = store.claim_due(now=T0 + timedelta(minutes=10), limit=10, lease_seconds=60)
    assert retried.attempts == 1

    store.mark_retry(retried.document_id, answer="451 again", next_attempt_at=T0, failed=True)
    assert store.state_counts()[DocumentState.FAILED] == 1
    assert store.claim_due(now=T0 + timedelta(days=1), limit=10, lease_seconds=60) == []


def test_claimed_documents_carry_the_original_mail(store: SqlStore) -> None:
    record(store, mail(8, accepted(pdf("a"), filename=None), subject="Invoice 1042"))
    (claimed,) = store.claim_due(now=T0, limit=10, lease_seconds=60)
    assert claimed.filename == "invoice.pdf"
    assert claimed.original_subject == "Invoice 1042"
    assert claimed.original_sender == "Shop <shop@example.test>"
    assert claimed.original_message_id == "<8@shop.example>"
    assert claimed.original_date == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert claimed.original_date is not None
    assert claimed.original_date.utcoffset() == timedelta(0)
    assert claimed.sha256 == hashlib.sha256(pdf("a")).hexdigest()
    assert (claimed.attempts, claimed.resend_count) == (0, 0)


def test_concurrent_claims_never_share_a_document(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    record(first, *(mail(uid, accepted(pdf(str(uid)))) for uid in range(1, 41)))
    barrier = threading.Barrier(2)
    claimed: dict[int, list[int]] = {0: [], 1: []}
    failures: list[BaseException] = []

    def worker(index: int, store: SqlStore) -> None:
        try:
            barrier.wait()
            while batch := store.claim_due(now=T0, limit=3, lease_seconds=600):
                claimed[index].extend(c.document_id for c in batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate([first, second])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert set(claimed[0]).isdisjoint(claimed[1])
    assert len(claimed[0]) + len(claimed[1]) == 40


def test_forwarding_drops_the_bytes_unless_kept(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    dropped, kept = store.claim_due(now=T0, limit=10, lease_seconds=60)
    for document, keep in ((dropped, False), (kept, True)):
        store.mark_forwarded(
            document.document_id,
            message_id=f"<relay-{document.sha256[:8]}@relay>",
            answer="250 OK",
            now=T0 + timedelta(seconds=5),
            keep_pdf=keep,
        )
    assert document_content(store, dropped.document_id) is None
    assert document_content(store, kept.document_id) == pdf("b")
    assert store.state_counts()[DocumentState.FORWARDED] == 2

    assert not store.resend(sha256=dropped.sha256, now=T0)
    assert not store.resend(sha256="0" * 64, now=T0)
    assert store.resend(sha256=kept.sha256, now=T0 + timedelta(minutes=1))
    (again,) = store.claim_due(now=T0 + timedelta(minutes=1), limit=10, lease_seconds=60)
    assert (again.document_id, again.resend_count, again.content) == (
        kept.document_id,
        1,
        pdf("b"),
    )


def test_requeue_brings_failed_documents_back(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    first, second = store.claim_due(now=T0, limit=10, lease_seconds=60)
    store.mark_failed(first.document_id, answer="554 content rejected")
    store.mark_failed(second.document_id, answer="554 content rejected")
    assert store.state_counts()[DocumentState.FAILED] == 2
    assert store.requeue(sha256="f" * 64, now=T0) == 0
    assert store.requeue(sha256=first.sha256, now=T0) == 1
    assert store.requeue(sha256=None, now=T0) == 1
    assert store.requeue(sha256=None, now=T0) == 0
    requeued = store.claim_due(now=T0, limit=10, lease_seconds=60)
    assert [(d.document_id, d.attempts) for d in requeued] == [
        (first.document_id, 0),
        (second.document_id, 0),
    ]


# --- the audit view --------------------------------------------------------------------


def test_the_audit_view_shows_outcomes_and_forwarding(store: SqlStore) -> None:
    first, duplicate, _, _ = record(
        store,
        mail(1, accepted(pdf("a"), invoice_number="1042")),
        mail(2, accepted(pdf("a"), invoice_number="1042")),
        mail(3, PartRecord(part="2", kind=SightingKind.REJECTED, reason="not a PDF")),
        mail(4, PartRecord(part="", kind=SightingKind.NO_PDF)),
        now=T0,
    )
    record(store, mail(5, accepted(pdf("b"))), now=T0 + timedelta(hours=1))
    sent, refused = store.claim_due(now=T0 + timedelta(hours=1), limit=10, lease_seconds=60)
    store.mark_forwarded(
        sent.document_id,
        message_id="<out-1@relay>",
        answer="250 queued",
        now=T0 + timedelta(hours=2),
        keep_pdf=False,
    )
    store.mark_failed(refused.document_id, answer="554 5.7.1 spam")

    rows = store.audit(AuditFilter())
    assert [row.uid for row in rows] == [5, 4, 3, 2, 1]  # newest first
    by_uid = {row.uid: row for row in rows}
    assert by_uid[1].outcome is Outcome.FORWARDED
    assert by_uid[1].forwarded_at == T0 + timedelta(hours=2)
    assert by_uid[1].forwarded_message_id == "<out-1@relay>"
    assert by_uid[1].attempts == 1
    assert by_uid[1].duplicate_of is None
    assert by_uid[2].outcome is Outcome.DUPLICATE
    assert by_uid[2].duplicate_of == first.sighting_id
    assert by_uid[2].reason == duplicate.reason
    assert (by_uid[2].forwarded_at, by_uid[2].forwarded_message_id, by_uid[2].attempts) == (
        None,
        None,
        None,
    )
    assert by_uid[3].outcome is Outcome.REJECTED
    assert by_uid[3].reason == "not a PDF"
    assert by_uid[4].outcome is Outcome.NO_PDF
    assert by_uid[4].sha256 is None
    assert by_uid[5].outcome is Outcome.FAILED
    assert by_uid[5].reason == "554 5.7.1 spam"
    assert by_uid[5].received_at == T0 + timedelta(hours=1)
    assert by_uid[1].mail_date == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert (by_uid[1].mailbox, by_uid[1].uidvalidity) == (MAILBOX, UIDVALIDITY)

    since = store.audit(AuditFilter(since=T0 + timedelta(minutes=30)))
    assert [row.uid for row in since] == [5]
    chosen = store.audit(AuditFilter(outcomes=(Outcome.DUPLICATE, Outcome.NO_PDF)))
    assert [row.uid for row in chosen] == [4, 2]
    invoice = store.audit(AuditFilter(invoice_number="1042"))
    assert [row.uid for row in invoice] == [2, 1]
    assert [row.uid for row in store.audit(AuditFilter(limit=2))] == [5, 4]
    sent_count = len(store.audit(AuditFilter(outcomes=(Outcome.FORWARDED,))))
    assert sent_count == 1


# --- connections, locks, errors --------------------------------------------------------


def test_poll_lock_is_exclusive_across_stores(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    postgresql = first.engine.dialect.name == "postgresql"
    with first.poll_lock(MAILBOX) as held:
        assert held
        with second.poll_lock(MAILBOX) as contended:
            assert contended is not postgresql
        with second.poll_lock("other@example.test/INBOX") as other:
            assert other
    with second.poll_lock(MAILBOX) as afterwards:
        assert afterwards


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("postgres://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("postgresql+psycopg://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("sqlite:///relay.db", "sqlite"),
    ],
)
def test_urls_are_normalised_to_psycopg(url: str, driver: str) -> None:
    store = SqlStore(url)
    try:
        assert store.engine.url.drivername == driver
    finally:
        store.close()


@pytest.mark.parametrize("url", ["not a url", "mysql://relay@127.0.0.1/relay"])
def test_unusable_urls_raise_store_error(url: str) -> None:
    with pytest.raises(StoreError):
        SqlStore(url)


def test_an_unreachable_database_raises_store_error_without_the_password() -> None:
    from tests.servers.postgres import _free_port

    store = SqlStore(f"postgresql://relay:hunter2secret@127.0.0.1:{_free_port()}/relay")
    try:
        with pytest.raises(StoreError) as caught:
            store.position(MAILBOX)
    finally:
        store.close()
    assert "hunter2secret" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
