"""What many routes share in the database, against SQLite and PostgreSQL (`integration`):
fire-time claims, each route's last poll, the purge of a removed route's folder, and the
destinations no configured folder sends."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.documents import OWNER
from tests.storecases import (
    MAILBOX,
    T0,
    StoreFactory,
    accepted,
    document_content,
    mail,
    pdf,
    record,
)
from worker.models import AuditFilter, DocumentState, Outcome, PurgeCounts
from worker.store import schema
from worker.store.routes import OLDER_THAN_DESTINATIONS
from worker.store.sqlstore import SqlStore

SECOND = "second@imap.example/INBOX"
SHOP_A = "smtp:a@accounting.example"
SHOP_B = "smtp:b@accounting.example"


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


# --- fire times ----------------------------------------------------------------------


def test_one_replica_claims_each_fire_time(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    assert first.claim_fire("shop-a", T0, "replica-1")
    assert not second.claim_fire("shop-a", T0, "replica-2")  # a conflict is an answer
    assert not first.claim_fire("shop-a", T0, "replica-1")  # even for the winner
    assert second.claim_fire("shop-a", T0 + timedelta(minutes=5), "replica-2")
    assert second.claim_fire("shop-b", T0, "replica-2")
    assert first.forget_claims_older_than(3600) == 0  # made just now: kept
    assert not first.claim_fire("shop-a", T0, "replica-1")
    assert first.forget_claims_older_than(-3600) == 3  # "older than an hour from now"
    assert first.claim_fire("shop-a", T0, "replica-1")  # forgotten, so free again


def test_replicas_claiming_together_get_one_winner(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    won: list[bool] = []

    def claim(replica: SqlStore, owner: str) -> None:
        barrier.wait()
        won.append(replica.claim_fire("shop-a", T0, owner))

    threads = [
        threading.Thread(target=claim, args=(replica, f"replica-{number}"))
        for number, replica in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(won) == [False, False, False, True]


# --- last polls ----------------------------------------------------------------------


def test_the_last_poll_is_the_latest_started_and_success_only_moves_forward(
    store: SqlStore,
) -> None:
    store.record_route_poll(
        "shop-a",
        started_at=T0,
        finished_at=T0 + timedelta(minutes=1),
        ok=True,
        summary="2 mails read",
        error=None,
        owner="replica-1",
    )
    store.record_route_poll(
        "shop-a",
        started_at=T0 + timedelta(minutes=5),
        finished_at=T0 + timedelta(minutes=6),
        ok=False,
        summary="failed",
        error="IMAP login refused",
        owner="replica-2",
    )
    (state,) = store.route_polls().values()
    assert (state.route, state.owner, state.last_error, state.ok) == (
        "shop-a",
        "replica-2",
        "IMAP login refused",
        False,
    )
    assert state.last_success_at == T0 + timedelta(minutes=1)
    # A poll that started earlier but ended later, and succeeded: the last poll stays
    # the one that started last; its success still counts.
    store.record_route_poll(
        "shop-a",
        started_at=T0 + timedelta(minutes=2),
        finished_at=T0 + timedelta(minutes=8),
        ok=True,
        summary="0 mails read",
        error=None,
        owner="replica-3",
    )
    state = store.route_polls()["shop-a"]
    assert (state.owner, state.last_started_at) == ("replica-2", T0 + timedelta(minutes=5))
    assert state.last_success_at == T0 + timedelta(minutes=8)


# --- removed routes ------------------------------------------------------------------


def _forward(store: SqlStore, mailbox: str, *, keep_pdf: bool = False) -> None:
    for document in store.claim_due(
        now=T0, limit=10, owner=OWNER, lease_seconds=60, mailbox=mailbox
    ):
        store.mark_forwarded(
            document.document_id,
            owner=OWNER,
            message_id="<m@relay>",
            answer="250 ok",
            now=T0,
            keep_pdf=keep_pdf,
        )


def _count(store: SqlStore, table: sa.Table) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_purging_a_folder_deletes_what_it_introduced_and_hands_shared_documents_over(
    store: SqlStore,
) -> None:
    (sent,) = record(
        store, mail(1, accepted(pdf("a"))), destination=SHOP_A, route="shop-a", advance_to=1
    )
    _forward(store, MAILBOX)
    (waiting,) = record(
        store, mail(2, accepted(pdf("b"))), destination=SHOP_A, route="shop-a", advance_to=2
    )
    store.record_mail_actions(mailbox=MAILBOX, uidvalidity=7, uids=[1], action="seen", now=T0)
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(schema.notifications).values(
                id=1,
                sent_at=T0,
                recipient="boss@example.test",
                last_sighting_id=2,
                failed_documents=1,
                problem_sightings=0,
            )
        )
        connection.execute(
            sa.insert(schema.notified_documents).values(
                document_id=waiting.document_id, notification_id=1
            )
        )
    # The other folder saw the sent invoice too (a duplicate), and one of its own.
    (seen_again,) = record(
        store, mail(5, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_A, route="shop-b"
    )
    (later,) = record(
        store, mail(6, accepted(pdf("a"))), mailbox=SECOND, destination=SHOP_A, route="shop-b"
    )
    record(store, mail(7, accepted(pdf("c"))), mailbox=SECOND, destination=SHOP_A, route="shop-b")
    assert seen_again.duplicate_of == sent.sighting_id
    assert store.route_mailboxes("shop-a") == [MAILBOX]

    counts = store.purge(MAILBOX)

    assert counts == PurgeCounts(
        sightings=2, documents=1, documents_kept=1, mail_actions=1, positions=1
    )
    assert store.position(MAILBOX) is None
    assert document_content(store, waiting.document_id or 0) is None
    assert _count(store, schema.notified_documents) == 0
    rows = {row.uid: row for row in store.audit(AuditFilter())}
    assert set(rows) == {5, 6, 7}
    # The oldest sighting left introduces the document now: still forwarded once.
    assert (rows[5].outcome, rows[5].duplicate_of) == (Outcome.FORWARDED, None)
    assert rows[6].duplicate_of == seen_again.sighting_id
    assert sum(row.outcome is Outcome.FORWARDED for row in rows.values()) == 1
    assert store.state_counts(SECOND)[DocumentState.FORWARDED] == 1
    assert later.document_id == sent.document_id
    assert store.route_mailboxes("shop-a") == []


def test_purging_before_a_date_keeps_the_newer_mail_and_the_position(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A, advance_to=1)
    record(
        store,
        mail(2, accepted(pdf("b"))),
        destination=SHOP_A,
        advance_to=2,
        now=T0 + timedelta(days=40),
    )
    counts = store.purge(MAILBOX, before=T0 + timedelta(days=1))
    assert (counts.sightings, counts.documents, counts.positions) == (1, 1, 0)
    assert [row.uid for row in store.audit(AuditFilter())] == [2]
    position = store.position(MAILBOX)
    assert position is not None and position.last_uid == 2  # nothing is read again


def test_a_purge_of_a_document_seen_again_in_the_same_folder_later_keeps_it(
    store: SqlStore,
) -> None:
    (first,) = record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    (again,) = record(
        store, mail(2, accepted(pdf("a"))), destination=SHOP_A, now=T0 + timedelta(days=40)
    )
    counts = store.purge(MAILBOX, before=T0 + timedelta(days=1))
    assert (counts.sightings, counts.documents, counts.documents_kept) == (1, 0, 1)
    (row,) = store.audit(AuditFilter())
    assert (row.uid, row.outcome) == (2, Outcome.PENDING)
    assert again.document_id == first.document_id
    assert document_content(store, first.document_id or 0) == pdf("a")  # still to be sent


def test_orphaned_destinations_are_those_no_configured_folder_sends(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), destination=SHOP_A)
    record(store, mail(1, accepted(pdf("b"))), mailbox=SECOND, destination=SHOP_B)
    record(store, mail(2, accepted(pdf("c"))), mailbox=SECOND, destination=SHOP_B)
    record(store, mail(3, accepted(pdf("d"))), mailbox=SECOND, destination=SHOP_B)
    _forward(store, SECOND)  # forwarded ones wait for nothing
    record(store, mail(4, accepted(pdf("e"))), mailbox=SECOND, destination=SHOP_B)
    with store.engine.begin() as connection:  # a document from before destinations
        connection.execute(
            sa.insert(schema.documents).values(
                sha256="f" * 64,
                state="pending",
                attempts=0,
                next_attempt_at=T0,
                resend_count=0,
                created_at=T0,
            )
        )
    assert store.orphaned_destinations([MAILBOX, SECOND]) == [(OLDER_THAN_DESTINATIONS, 1)]
    assert store.orphaned_destinations([MAILBOX]) == [
        (OLDER_THAN_DESTINATIONS, 1),
        (SHOP_B, 1),
    ]
    assert store.orphaned_destinations([]) == [
        (OLDER_THAN_DESTINATIONS, 1),
        (SHOP_A, 1),
        (SHOP_B, 1),
    ]
