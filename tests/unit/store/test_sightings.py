"""SqlStore recording what a poll read, against SQLite and PostgreSQL (`integration`):
documents claimed by INSERT, duplicates by sha256 and content key, replays and ERROR
retries, and the mailbox position."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import pytest

from tests.documents import DESTINATION, poll_owner
from tests.storecases import (
    MAILBOX,
    T0,
    UIDVALIDITY,
    StoreFactory,
    accepted,
    document_content,
    mail,
    pdf,
    record,
    sighting_tries,
)
from worker.models import (
    AuditFilter,
    DedupMode,
    DocumentState,
    Outcome,
    PartRecord,
    RecordedSighting,
    SightingKind,
)
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


# --- claiming and duplicates -----------------------------------------------------------


def test_a_new_pdf_claims_a_pending_document(store: SqlStore) -> None:
    (first,) = store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
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
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
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
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
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
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
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
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
        mailbox=MAILBOX,
        uidvalidity=UIDVALIDITY,
        mails=batch,
        advance_to=3,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=T0,
    )
    replay = store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
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
            destination=DESTINATION,
            owner=poll_owner(store, MAILBOX),
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
            destination=DESTINATION,
            owner=poll_owner(store, MAILBOX),
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

    store.reset_position(MAILBOX, 99, owner=poll_owner(store, MAILBOX))
    position = store.position(MAILBOX)
    assert position is not None
    assert (position.uidvalidity, position.last_uid) == (99, 0)
    advance(3, uidvalidity=99)
    position = store.position(MAILBOX)
    assert position is not None
    assert (position.uidvalidity, position.last_uid) == (99, 3)
