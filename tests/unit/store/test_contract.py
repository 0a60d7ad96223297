"""The rules every store keeps, run against the in-memory `FakeStore` that the pipeline
and send-loop tests use and against `SqlStore` (SQLite; PostgreSQL, `integration`), so
that the fake cannot drift from the SQL."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

from tests.documents import DESTINATION, OWNER, PollLeases, poll_owner
from tests.fakes import FakeStore
from tests.servers.postgres import temporary_database
from worker.errors import LeaseLost
from worker.models import (
    AuditFilter,
    DedupMode,
    DocumentState,
    MailboxPosition,
    MailHeaders,
    MailRecord,
    Outcome,
    PartRecord,
    RecordedSighting,
    SightingKind,
)
from worker.relay.ports import AdminStore, AuditReader, Leases, PollStore, SendQueue
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MAILBOX = "invoices@imap.example/INBOX"


class AnyStore(PollStore, SendQueue, Leases, AuditReader, AdminStore, PollLeases, Protocol):
    """What both stores implement (for the type checker only)."""


@pytest.fixture(
    params=["fake", "sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    if request.param == "fake":
        yield FakeStore()
        return
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'relay.db'}"
        else:
            url = stack.enter_context(
                temporary_database(request.getfixturevalue("postgres_base_url"))
            )
        sql = SqlStore(url)
        stack.callback(sql.close)
        create_schema(sql.engine)
        yield sql


def pdf(text: str, *, fingerprint: str | None = None) -> PartRecord:
    data = f"%PDF-1.4 {text}".encode()
    return PartRecord(
        part="2",
        kind=SightingKind.DOCUMENT,
        filename=f"{text}.pdf",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        fingerprint=fingerprint or f"fp:{text}",
        content=data,
    )


def record(
    store: AnyStore,
    uid: int,
    *parts: PartRecord,
    dedup: DedupMode = DedupMode.BYTES,
    uidvalidity: int = 1,
    advance_to: int | None = None,
    now: datetime = NOW,
) -> list[RecordedSighting]:
    recorded = store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
        mailbox=MAILBOX,
        uidvalidity=uidvalidity,
        mails=[
            MailRecord(
                uid=uid,
                headers=MailHeaders(subject=f"mail {uid}", sender="Shop <a@shop.example>"),
                parts=parts,
            )
        ],
        advance_to=uid if advance_to is None else advance_to,
        dedup=dedup,
        keep_pdfs=False,
        now=now,
    )
    # As a poll ends: the poll lease handed back, for the lease tests' owners.
    store.end_poll_lease(MAILBOX, owner=OWNER)
    return recorded


def error(reason: str = "worker died", part: str = "2") -> PartRecord:
    return PartRecord(part=part, kind=SightingKind.ERROR, reason=reason)


def test_the_same_bytes_are_one_document_and_later_sightings_name_the_first(
    store: AnyStore,
) -> None:
    (first,) = record(store, 1, pdf("a"))
    (again,) = record(store, 2, pdf("a"))
    assert first.kind is SightingKind.DOCUMENT and first.inserted
    assert again.kind is SightingKind.DUPLICATE and again.inserted
    assert again.document_id == first.document_id
    assert again.duplicate_of == first.sighting_id
    assert again.reason == f"same sha256 as sighting {first.sighting_id}"
    assert store.state_counts()[DocumentState.PENDING] == 1
    assert (
        store.known_key(destination=DESTINATION, sha256=pdf("a").sha256 or "", content_key=None)
        == "sha256"
    )
    assert store.known_key(destination=DESTINATION, sha256="unknown", content_key="fp:a") is None


@pytest.mark.parametrize(
    ("dedup", "documents", "reason"),
    [
        (DedupMode.CONTENT, 1, "same content fingerprint as sighting 1"),
        (DedupMode.BYTES, 2, None),
    ],
)
def test_a_re_render_is_a_duplicate_only_in_content_mode(
    store: AnyStore, dedup: DedupMode, documents: int, reason: str | None
) -> None:
    record(store, 1, pdf("a", fingerprint="same pages"), dedup=dedup)
    (second,) = record(store, 2, pdf("a, re-saved", fingerprint="same pages"), dedup=dedup)
    assert store.state_counts()[DocumentState.PENDING] == documents
    assert second.reason == reason
    content_key = "same pages" if dedup is DedupMode.CONTENT else None
    known = store.known_key(destination=DESTINATION, sha256="unknown", content_key=content_key)
    assert known == ("content fingerprint" if dedup is DedupMode.CONTENT else None)


def test_a_sighting_is_recorded_once_unless_it_is_an_error(store: AnyStore) -> None:
    (first,) = record(store, 1, pdf("a"))
    (replayed,) = record(store, 1, pdf("a"))
    assert not replayed.inserted
    assert (replayed.sighting_id, replayed.kind) == (first.sighting_id, SightingKind.DOCUMENT)

    (failed,) = record(store, 2, error())
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=1, max_tries=3) == [2]
    (retried,) = record(store, 2, pdf("b"))
    assert retried.inserted and retried.sighting_id == failed.sighting_id
    assert retried.kind is SightingKind.DOCUMENT
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=1, max_tries=3) == []


def test_a_mail_level_error_gives_way_to_its_parts(store: AnyStore) -> None:
    record(store, 1, error(part=""))
    record(store, 1, pdf("a"), PartRecord(part="3", kind=SightingKind.REJECTED, reason="no"))
    rows = store.audit(AuditFilter())
    assert {(row.uid, row.outcome) for row in rows} == {(1, Outcome.PENDING), (1, Outcome.REJECTED)}
    assert len(rows) == 2


def test_errors_are_retried_until_they_are_given_up(store: AnyStore) -> None:
    record(store, 1, error("timeout"))
    record(store, 1, error("timeout"))
    record(store, 2, error("crash"))
    assert store.error_uids(mailbox=MAILBOX, uidvalidity=1, max_tries=2) == [2]
    assert store.reject_exhausted_errors(mailbox=MAILBOX, max_tries=2) == 1
    assert store.abandon_errors(mailbox=MAILBOX, uidvalidity=1, uids=[2], reason="gone") == 1
    reasons = {row.uid: (row.outcome, row.reason) for row in store.audit(AuditFilter())}
    assert reasons == {
        1: (Outcome.REJECTED, "gave up after 2 tries: timeout"),
        2: (Outcome.REJECTED, "gone; before: crash"),
    }
    assert store.abandon_errors(mailbox=MAILBOX, uidvalidity=1, uids=None, reason="x") == 0


def test_the_position_never_goes_back_under_one_uidvalidity(store: AnyStore) -> None:
    assert store.position(MAILBOX) is None
    record(store, 5, pdf("a"))
    record(store, 3, pdf("b"))
    assert store.position(MAILBOX) == MailboxPosition(mailbox=MAILBOX, uidvalidity=1, last_uid=5)
    record(store, 2, pdf("c"), uidvalidity=9)
    assert store.position(MAILBOX) == MailboxPosition(mailbox=MAILBOX, uidvalidity=9, last_uid=2)
    store.reset_position(MAILBOX, 10, owner=poll_owner(store, MAILBOX))
    assert store.position(MAILBOX) == MailboxPosition(mailbox=MAILBOX, uidvalidity=10, last_uid=0)


def test_a_document_needs_its_hash_and_bytes(store: AnyStore) -> None:
    with pytest.raises(ValueError, match="needs sha256 and bytes"):
        record(store, 1, PartRecord(part="2", kind=SightingKind.DOCUMENT, sha256="x"))
    assert store.audit(AuditFilter()) == []


def test_the_queue_leases_marks_and_requeues(store: AnyStore) -> None:
    (first,) = record(store, 1, pdf("a"))
    record(store, 2, pdf("b"))
    claimed = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=10, lease_seconds=60)
    assert [c.document_id for c in claimed] == sorted(c.document_id for c in claimed)
    assert claimed[0].content == pdf("a").content
    assert (claimed[0].original_subject, claimed[0].attempts) == ("mail 1", 0)
    assert (
        store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=10, lease_seconds=60) == []
    )  # leased
    a, b = (c.document_id for c in claimed)
    store.mark_forwarded(
        a, owner=OWNER, message_id="<m@relay>", answer="250 ok", now=NOW, keep_pdf=False
    )
    store.release(b, owner=OWNER)
    (again,) = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=10, lease_seconds=60)
    assert again.document_id == b
    later = NOW + timedelta(minutes=1)
    store.mark_retry(b, owner=OWNER, answer="451 later", next_attempt_at=later, failed=False)
    assert (
        store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=10, lease_seconds=60) == []
    )  # not due yet
    (retried,) = store.claim_due(
        mailbox=MAILBOX, owner=OWNER, now=later, limit=10, lease_seconds=60
    )
    assert retried.attempts == 1
    store.mark_failed(b, owner=OWNER, answer="550 no")
    assert store.state_counts() == {
        DocumentState.PENDING: 0,
        DocumentState.FORWARDED: 1,
        DocumentState.FAILED: 1,
    }
    rows = {row.uid: row for row in store.audit(AuditFilter())}
    assert (rows[1].outcome, rows[1].forwarded_message_id, rows[1].attempts) == (
        Outcome.FORWARDED,
        "<m@relay>",
        1,
    )
    assert rows[1].id == first.sighting_id
    assert (rows[2].outcome, rows[2].reason, rows[2].attempts) == (Outcome.FAILED, "550 no", 2)

    assert not store.resend(sha256=pdf("a").sha256 or "", now=later)  # its PDF was dropped
    assert store.requeue(sha256=None, now=later) == 1
    (requeued,) = store.claim_due(
        mailbox=MAILBOX, owner=OWNER, now=later, limit=10, lease_seconds=60
    )
    assert (requeued.document_id, requeued.attempts) == (b, 0)


def test_a_kept_pdf_can_be_resent(store: AnyStore) -> None:
    record(store, 1, pdf("a"))
    (claimed,) = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=1, lease_seconds=60)
    store.mark_forwarded(
        claimed.document_id, owner=OWNER, message_id="<m>", answer="250", now=NOW, keep_pdf=True
    )
    assert store.resend(sha256=claimed.sha256, now=NOW)
    assert not store.resend(sha256=claimed.sha256, now=NOW)  # pending already
    (resent,) = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=1, lease_seconds=60)
    assert (resent.document_id, resent.resend_count) == (claimed.document_id, 1)


def test_the_audit_filters_and_orders_newest_first(store: AnyStore) -> None:
    record(store, 1, pdf("a"), now=NOW)
    record(store, 2, PartRecord(part="", kind=SightingKind.NO_PDF), now=NOW + timedelta(hours=1))
    record(store, 3, pdf("a"), now=NOW + timedelta(hours=2))
    assert [row.uid for row in store.audit(AuditFilter())] == [3, 2, 1]
    assert [row.uid for row in store.audit(AuditFilter(limit=2))] == [3, 2]
    since = AuditFilter(since=NOW + timedelta(minutes=30))
    assert [row.uid for row in store.audit(since)] == [3, 2]
    duplicates = AuditFilter(outcomes=(Outcome.DUPLICATE, Outcome.PENDING))
    assert [(row.uid, row.outcome) for row in store.audit(duplicates)] == [
        (3, Outcome.DUPLICATE),
        (1, Outcome.PENDING),
    ]
    (row,) = store.audit(AuditFilter(outcomes=(Outcome.NO_PDF,)))
    assert (row.subject, row.sender, row.filename) == ("mail 2", "Shop <a@shop.example>", None)


# --- leases ------------------------------------------------------------------------------


def test_poll_writes_need_the_poll_lease(store: AnyStore) -> None:
    record(store, 1, pdf("a"))
    assert store.take_poll_lease(MAILBOX, owner="other", lease_seconds=60)
    assert not store.take_poll_lease(MAILBOX, owner=OWNER, lease_seconds=60)
    mails = [MailRecord(uid=2, headers=MailHeaders(), parts=(pdf("b"),))]
    for owner in (OWNER, "nobody"):
        with pytest.raises(LeaseLost):
            store.record_mails(
                destination=DESTINATION,
                owner=owner,
                mailbox=MAILBOX,
                uidvalidity=1,
                mails=mails,
                advance_to=2,
                dedup=DedupMode.BYTES,
                keep_pdfs=False,
                now=NOW,
            )
        with pytest.raises(LeaseLost):
            store.reset_position(MAILBOX, 9, owner=owner)
    # Nothing changed: neither the sighting nor the position.
    assert [row.uid for row in store.audit(AuditFilter())] == [1]
    assert store.position(MAILBOX) == MailboxPosition(mailbox=MAILBOX, uidvalidity=1, last_uid=1)
    store.end_poll_lease(MAILBOX, owner=OWNER)  # not its own: nothing handed back
    assert not store.take_poll_lease(MAILBOX, owner=OWNER, lease_seconds=60)
    assert store.take_poll_lease("other mailbox", owner=OWNER, lease_seconds=60)
    store.end_poll_lease(MAILBOX, owner="other")
    assert store.take_poll_lease(MAILBOX, owner=OWNER, lease_seconds=60)


def test_document_writes_are_fenced_by_their_owner(store: AnyStore) -> None:
    record(store, 1, pdf("a"))
    (claimed,) = store.claim_due(
        mailbox=MAILBOX, owner="first", now=NOW, limit=10, lease_seconds=60
    )
    document = claimed.document_id
    assert (
        store.claim_due(mailbox=MAILBOX, owner="second", now=NOW, limit=10, lease_seconds=60) == []
    )
    writes: list[Callable[[], None]] = [
        lambda: store.mark_forwarded(
            document, owner="second", message_id="<m>", answer="250", now=NOW, keep_pdf=False
        ),
        lambda: store.mark_retry(
            document, owner="second", answer="451", next_attempt_at=NOW, failed=False
        ),
        lambda: store.mark_failed(document, owner="second", answer="554"),
        lambda: store.release(document, owner="second"),
    ]
    for write in writes:
        with pytest.raises(LeaseLost):
            write()
    assert store.state_counts()[DocumentState.PENDING] == 1
    assert not store.still_holds(document, owner="second", lease_seconds=60)
    assert store.still_holds(document, owner="first", lease_seconds=60)
    store.release(document, owner="first")
    # A released lease is no one's: its old owner is fenced too.
    assert not store.still_holds(document, owner="first", lease_seconds=60)
    with pytest.raises(LeaseLost):
        store.mark_failed(document, owner="first", answer="554")
    (again,) = store.claim_due(mailbox=MAILBOX, owner="second", now=NOW, limit=10, lease_seconds=60)
    assert (again.document_id, again.attempts) == (document, 0)
    store.mark_failed(document, owner="second", answer="554")
    assert store.state_counts()[DocumentState.FAILED] == 1


def test_renew_and_release_all_cover_every_lease_of_one_owner(store: AnyStore) -> None:
    record(store, 1, pdf("a"))
    record(store, 2, pdf("b"))
    store.claim_due(mailbox=MAILBOX, owner=OWNER, now=NOW, limit=10, lease_seconds=60)
    assert store.take_poll_lease(MAILBOX, owner=OWNER, lease_seconds=60)
    assert store.renew(OWNER, lease_seconds=60) == 3  # two documents and the mailbox
    assert store.renew("someone else", lease_seconds=60) == 0
    assert store.release_all(OWNER) == 2
    assert store.renew(OWNER, lease_seconds=60) == 0
    assert (
        len(store.claim_due(mailbox=MAILBOX, owner="next", now=NOW, limit=10, lease_seconds=60))
        == 2
    )
    assert store.take_poll_lease(MAILBOX, owner="next", lease_seconds=60)


def test_an_expired_lease_is_lost_and_taken_over(store: AnyStore) -> None:
    record(store, 1, pdf("a"))
    (claimed,) = store.claim_due(
        mailbox=MAILBOX, owner="stale", now=NOW, limit=10, lease_seconds=0.2
    )
    assert store.take_poll_lease(MAILBOX, owner="stale", lease_seconds=0.2)
    # Polled until the store's own clock passes the leases (no fixed sleep).
    deadline = time.monotonic() + 30
    while store.take_poll_lease(MAILBOX, owner="probe", lease_seconds=60) is False:
        assert time.monotonic() < deadline, "the poll lease did not expire"
        time.sleep(0.05)
    assert not store.still_holds(claimed.document_id, owner="stale", lease_seconds=60)
    assert store.renew("stale", lease_seconds=60) == 0
    with pytest.raises(LeaseLost):
        store.release(claimed.document_id, owner="stale")
    (taken,) = store.claim_due(
        mailbox=MAILBOX, owner="current", now=NOW, limit=10, lease_seconds=60
    )
    assert taken.document_id == claimed.document_id
