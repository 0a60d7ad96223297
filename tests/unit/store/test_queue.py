"""SqlStore's send queue against SQLite and PostgreSQL (`integration`): leases, due
times, the original mail, concurrent claims, dropped bytes and requeueing."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.documents import OWNER, QUEUE_MAILBOX
from tests.storecases import (
    T0,
    StoreFactory,
    accepted,
    document_content,
    mail,
    pdf,
    record,
)
from worker.models import (
    AuditFilter,
    DocumentState,
)
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


# --- sending ---------------------------------------------------------------------------


def test_claim_due_waits_for_the_next_attempt(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))))
    (claimed,) = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    store.mark_retry(
        claimed.document_id,
        owner=OWNER,
        answer="451 try later",
        next_attempt_at=T0 + timedelta(minutes=10),
        failed=False,
    )
    assert (
        store.claim_due(
            mailbox=QUEUE_MAILBOX,
            owner=OWNER,
            now=T0 + timedelta(minutes=9),
            limit=10,
            lease_seconds=60,
        )
        == []
    )
    (retried,) = store.claim_due(
        mailbox=QUEUE_MAILBOX,
        owner=OWNER,
        now=T0 + timedelta(minutes=10),
        limit=10,
        lease_seconds=60,
    )
    assert retried.attempts == 1

    store.mark_retry(
        retried.document_id, owner=OWNER, answer="451 again", next_attempt_at=T0, failed=True
    )
    assert store.state_counts()[DocumentState.FAILED] == 1
    assert (
        store.claim_due(
            mailbox=QUEUE_MAILBOX,
            owner=OWNER,
            now=T0 + timedelta(days=1),
            limit=10,
            lease_seconds=60,
        )
        == []
    )


def test_claimed_documents_carry_the_original_mail(store: SqlStore) -> None:
    record(store, mail(8, accepted(pdf("a"), filename=None), subject="Invoice 1042"))
    (claimed,) = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    assert claimed.filename == "invoice.pdf"
    assert claimed.original_subject == "Invoice 1042"
    assert claimed.original_sender == "Shop <shop@example.test>"
    assert claimed.original_message_id == "<8@shop.example>"
    assert claimed.original_date == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert claimed.original_date is not None
    assert claimed.original_date.utcoffset() == timedelta(0)
    assert claimed.sha256 == hashlib.sha256(pdf("a")).hexdigest()
    assert (claimed.attempts, claimed.resend_count) == (0, 0)


def test_a_claim_knows_whether_the_invoice_number_was_ambiguous(store: SqlStore) -> None:
    # A retry from the database (another poll, another replica) must not file the first
    # of several numbers as the document's: the flag is kept with the sighting.
    record(
        store,
        mail(1, accepted(pdf("a"), invoice_number="1042", invoice_number_ambiguous=True)),
        mail(2, accepted(pdf("b"), invoice_number="1043")),
        mail(3, accepted(pdf("c"))),
    )
    claimed = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    assert [(c.invoice_number, c.invoice_number_ambiguous) for c in claimed] == [
        ("1042", True),
        ("1043", False),
        (None, False),
    ]
    # The audit shows the first number read, as it always has.
    numbers = {row.uid: row.invoice_number for row in store.audit(AuditFilter())}
    assert numbers == {1: "1042", 2: "1043", 3: None}


def test_concurrent_claims_never_share_a_document(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    record(first, *(mail(uid, accepted(pdf(str(uid)))) for uid in range(1, 41)))
    barrier = threading.Barrier(2)
    claimed: dict[int, list[int]] = {0: [], 1: []}
    failures: list[BaseException] = []

    def worker(index: int, store: SqlStore) -> None:
        try:
            barrier.wait()
            while batch := store.claim_due(
                mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=3, lease_seconds=600
            ):
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
    dropped, kept = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    for document, keep in ((dropped, False), (kept, True)):
        store.mark_forwarded(
            document.document_id,
            owner=OWNER,
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
    (again,) = store.claim_due(
        mailbox=QUEUE_MAILBOX,
        owner=OWNER,
        now=T0 + timedelta(minutes=1),
        limit=10,
        lease_seconds=60,
    )
    assert (again.document_id, again.resend_count, again.content) == (
        kept.document_id,
        1,
        pdf("b"),
    )


def test_requeue_brings_failed_documents_back(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    first, second = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    store.mark_failed(first.document_id, owner=OWNER, answer="554 content rejected")
    store.mark_failed(second.document_id, owner=OWNER, answer="554 content rejected")
    assert store.state_counts()[DocumentState.FAILED] == 2
    assert store.requeue(sha256="f" * 64, now=T0) == 0
    assert store.requeue(sha256=first.sha256, now=T0) == 1
    assert store.requeue(sha256=None, now=T0) == 1
    assert store.requeue(sha256=None, now=T0) == 0
    requeued = store.claim_due(
        mailbox=QUEUE_MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60
    )
    assert [(d.document_id, d.attempts) for d in requeued] == [
        (first.document_id, 0),
        (second.document_id, 0),
    ]
