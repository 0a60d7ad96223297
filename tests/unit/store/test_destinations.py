"""Dedup per destination against SQLite and PostgreSQL (`integration`): one PDF bound
for two destinations is a document of each, two folders feeding one destination share
theirs (also when two replicas record it at once), a document is sent by a poll of the
folder that introduced it, and retry/resend narrow a SHA-256 several destinations share."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from tests.documents import OWNER
from tests.storecases import MAILBOX, T0, StoreFactory, accepted, mail, pdf, record
from worker.errors import DestinationAmbiguous
from worker.models import AuditFilter, DedupMode, DocumentState, RecordedSighting, SightingKind
from worker.store.sqlstore import SqlStore

SECOND = "second@imap.example/INBOX"
SHOP_A = "smtp:a@accounting.example"
SHOP_B = "getmyinvoices:G-1"


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


def claim(store: SqlStore, mailbox: str, *, owner: str = OWNER) -> list[str]:
    return [
        document.sha256
        for document in store.claim_due(
            now=T0, limit=10, owner=owner, lease_seconds=60, mailbox=mailbox
        )
    ]


def test_the_same_pdf_bound_for_two_destinations_is_a_document_of_each(store: SqlStore) -> None:
    (first,) = record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    (second,) = record(store, mail(1, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_B)
    assert (first.kind, second.kind) == (SightingKind.DOCUMENT, SightingKind.DOCUMENT)
    assert first.document_id != second.document_id
    rows = {(row.mailbox, row.uid): row for row in store.audit(AuditFilter())}
    assert rows[MAILBOX, 1].destination == SHOP_A
    assert rows[SECOND, 1].destination == SHOP_B
    # The content key is per destination too.
    (third,) = record(store, mail(2, accepted(pdf("a2"), fingerprint="fp:a")), destination=SHOP_A)
    (fourth,) = record(
        store,
        mail(2, accepted(pdf("a3"), fingerprint="fp:a")),
        mailbox=SECOND,
        destination=SHOP_B,
        dedup=DedupMode.CONTENT,
    )
    assert (third.kind, fourth.kind) == (SightingKind.DOCUMENT, SightingKind.DOCUMENT)
    (fifth,) = record(store, mail(3, accepted(pdf("a4"), fingerprint="fp:a")), destination=SHOP_A)
    assert fifth.kind is SightingKind.DUPLICATE
    assert fifth.reason == f"same content fingerprint as sighting {third.sighting_id}"


def test_two_folders_feeding_one_destination_share_documents(store: SqlStore) -> None:
    (first,) = record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A, route="shop-a")
    (second,) = record(
        store, mail(7, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_A, route="shop-b"
    )
    assert second.kind is SightingKind.DUPLICATE
    assert (second.document_id, second.duplicate_of) == (first.document_id, first.sighting_id)
    routes = {row.uid: row.route for row in store.audit(AuditFilter())}
    assert routes == {1: "shop-a", 7: "shop-b"}
    assert store.audit(AuditFilter(route="shop-b"))[0].uid == 7


def test_a_document_is_sent_by_a_poll_of_the_folder_that_introduced_it(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    record(store, mail(1, accepted(pdf("b"))), mailbox=SECOND, destination=SHOP_A)
    record(store, mail(2, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_A)  # duplicate
    assert store.state_counts(SECOND)[DocumentState.PENDING] == 1
    assert store.state_counts()[DocumentState.PENDING] == 2
    assert claim(store, SECOND) == [accepted(pdf("b")).sha256]
    assert claim(store, MAILBOX, owner="other") == [accepted(pdf("a")).sha256]
    assert claim(store, "unknown@imap.example/INBOX") == []


def record_at_once(stores: list[SqlStore], content: bytes, uid: int) -> list[RecordedSighting]:
    """Each store (a replica) records `content` in its own folder, released together."""
    barrier = threading.Barrier(len(stores))
    results: list[RecordedSighting] = []
    failures: list[BaseException] = []

    def poll(replica: SqlStore, mailbox: str) -> None:
        try:
            barrier.wait()
            results.extend(
                record(replica, mail(uid, accepted(content)), mailbox=mailbox, destination=SHOP_A)
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [
        threading.Thread(target=poll, args=(replica, mailbox))
        for replica, mailbox in zip(stores, [MAILBOX, SECOND], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    return results


def test_two_replicas_recording_one_pdf_at_once_make_one_document(
    store_factory: StoreFactory,
) -> None:
    # Each replica polls its own folder (its own poll lease); both feed one destination.
    # The unique key (destination, sha256) decides, whichever INSERT comes first.
    stores = [store_factory(), store_factory()]
    for round_number in range(5):
        results = record_at_once(stores, pdf(f"race {round_number}"), 10 + round_number)
        assert sorted(result.kind.value for result in results) == ["document", "duplicate"]
        assert len({result.document_id for result in results}) == 1


def test_retry_and_resend_narrow_a_sha256_of_several_destinations(store: SqlStore) -> None:
    sha256 = accepted(pdf("a")).sha256 or ""
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A, route="shop-a")
    record(store, mail(1, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_B, route="shop-b")
    for mailbox in (MAILBOX, SECOND):
        (document,) = store.claim_due(
            now=T0, limit=10, owner=OWNER, lease_seconds=60, mailbox=mailbox
        )
        store.mark_failed(document.document_id, owner=OWNER, answer="550 no")
    with pytest.raises(DestinationAmbiguous, match=f"{SHOP_B}, {SHOP_A}") as caught:
        store.requeue(sha256=sha256, now=T0)
    assert caught.value.destinations == (SHOP_B, SHOP_A)
    assert store.state_counts()[DocumentState.FAILED] == 2  # nothing changed
    assert store.requeue(sha256=sha256, now=T0, destination=SHOP_B) == 1
    assert store.requeue(sha256=sha256, now=T0, route="shop-a") == 1
    assert store.requeue(sha256=None, now=T0) == 0  # all of them, without a SHA-256: none left

    later = T0 + timedelta(minutes=1)
    for mailbox in (MAILBOX, SECOND):
        (document,) = store.claim_due(
            now=later, limit=10, owner=OWNER, lease_seconds=60, mailbox=mailbox
        )
        store.mark_forwarded(
            document.document_id,
            owner=OWNER,
            message_id="<m@relay>",
            answer="250 ok",
            now=later,
            keep_pdf=True,
        )
    with pytest.raises(DestinationAmbiguous):
        store.resend(sha256=sha256, now=later)
    with pytest.raises(DestinationAmbiguous):
        store.kept_content(sha256)
    assert store.kept_content(sha256, route="shop-b") == pdf("a")
    assert store.resend(sha256=sha256, now=later, route="shop-b")
    assert not store.resend(sha256=sha256, now=later, route="shop-b")  # pending already
    assert store.resend(sha256=sha256, now=later, destination=SHOP_A)
    assert store.state_counts()[DocumentState.PENDING] == 2


def test_one_destination_keeps_the_plain_commands(store: SqlStore) -> None:
    sha256 = accepted(pdf("a")).sha256 or ""
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    record(store, mail(2, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_A)
    (document,) = store.claim_due(now=T0, limit=10, owner=OWNER, lease_seconds=60, mailbox=MAILBOX)
    store.mark_failed(document.document_id, owner=OWNER, answer="550 no")
    assert store.requeue(sha256=sha256, now=T0) == 1
    assert store.known_key(sha256=sha256, content_key=None, destination=SHOP_A) == "sha256"
    assert store.known_key(sha256=sha256, content_key=None, destination=SHOP_B) is None


def test_the_upload_mark_is_the_destinations_document_only(store: SqlStore) -> None:
    sha256 = accepted(pdf("a")).sha256 or ""
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    record(store, mail(1, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_B)
    store.mark_upload_started(sha256, now=T0, destination=SHOP_B)
    (of_a,) = store.claim_due(now=T0, limit=10, owner=OWNER, lease_seconds=60, mailbox=MAILBOX)
    (of_b,) = store.claim_due(now=T0, limit=10, owner=OWNER, lease_seconds=60, mailbox=SECOND)
    assert (of_a.destination, of_a.upload_started) == (SHOP_A, False)
    assert (of_b.destination, of_b.upload_started) == (SHOP_B, True)
