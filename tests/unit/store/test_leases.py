"""SqlStore's leases against SQLite and PostgreSQL (`integration`): expiry on the
database's clock, fencing of a stale owner, renewal, the way out, the poll lease."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from tests.documents import DESTINATION, OWNER, latest_lease_expiry, wait_for_leases_to_expire
from tests.storecases import (
    MAILBOX,
    T0,
    UIDVALIDITY,
    StoreFactory,
    accepted,
    document_content,
    document_row,
    mail,
    pdf,
    record,
)
from worker.errors import LeaseLost
from worker.models import AuditFilter, DedupMode, DocumentState
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


def test_claim_due_leases_until_the_lease_expires(store_factory: StoreFactory) -> None:
    # Two stores (engines) as two replicas; the lease expires on the database's clock.
    store, other = store_factory(), store_factory()
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    claimed = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=2)
    assert [c.content for c in claimed] == [pdf("a"), pdf("b")]
    # Whatever the caller's clock says: only the database's decides an expiry.
    late = T0 + timedelta(days=1)
    assert (
        other.claim_due(mailbox=MAILBOX, owner="other", now=late, limit=10, lease_seconds=60) == []
    )
    wait_for_leases_to_expire(store)
    again = other.claim_due(mailbox=MAILBOX, owner="other", now=T0, limit=1, lease_seconds=60)
    assert [c.document_id for c in again] == [claimed[0].document_id]
    # Expired is lost, even when nobody took it over yet: fencing needs no race.
    with pytest.raises(LeaseLost):
        store.release(claimed[1].document_id, owner=OWNER)
    (taken,) = other.claim_due(mailbox=MAILBOX, owner="other", now=T0, limit=10, lease_seconds=60)
    assert taken.document_id == claimed[1].document_id


def test_a_released_document_is_claimed_again_at_once(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    claimed = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60)
    store.release(claimed[1].document_id, owner=OWNER)
    released = store.claim_due(mailbox=MAILBOX, owner="next", now=T0, limit=10, lease_seconds=60)
    assert [c.document_id for c in released] == [claimed[1].document_id]
    assert store.still_holds(claimed[0].document_id, owner=OWNER, lease_seconds=60)
    assert not store.still_holds(claimed[1].document_id, owner=OWNER, lease_seconds=60)
    assert store.still_holds(claimed[1].document_id, owner="next", lease_seconds=60)


def test_a_stale_owner_changes_nothing(store_factory: StoreFactory) -> None:
    stale, current = store_factory(), store_factory()
    record(stale, mail(1, accepted(pdf("a"))))
    (document,) = stale.claim_due(mailbox=MAILBOX, owner="stale", now=T0, limit=10, lease_seconds=1)
    wait_for_leases_to_expire(stale)
    (taken,) = current.claim_due(
        mailbox=MAILBOX, owner="current", now=T0, limit=10, lease_seconds=60
    )
    assert taken.document_id == document.document_id
    before = document_row(current, document.document_id)
    writes: list[Callable[[], None]] = [
        lambda: stale.mark_forwarded(
            document.document_id,
            owner="stale",
            message_id="<stale@relay>",
            answer="250 OK",
            now=T0,
            keep_pdf=False,
        ),
        lambda: stale.mark_retry(
            document.document_id, owner="stale", answer="451", next_attempt_at=T0, failed=False
        ),
        lambda: stale.mark_failed(document.document_id, owner="stale", answer="554"),
        lambda: stale.release(document.document_id, owner="stale"),
    ]
    for write in writes:
        with pytest.raises(LeaseLost):
            write()
    assert document_row(current, document.document_id) == before
    assert document_content(current, document.document_id) == pdf("a")
    assert not stale.still_holds(document.document_id, owner="stale", lease_seconds=60)
    assert stale.renew("stale", lease_seconds=60) == 0
    current.mark_forwarded(
        document.document_id,
        owner="current",
        message_id="<current@relay>",
        answer="250 OK",
        now=T0,
        keep_pdf=False,
    )
    assert current.state_counts()[DocumentState.FORWARDED] == 1


def test_a_renewed_lease_outlives_its_first_expiry(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    kept, dropped = store.claim_due(mailbox=MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=1)
    first_expiry = latest_lease_expiry(store)
    store.release(dropped.document_id, owner=OWNER)
    assert store.renew(OWNER, lease_seconds=60) == 1
    renewed = latest_lease_expiry(store)
    assert first_expiry is not None
    assert renewed is not None
    assert renewed > first_expiry
    while store.database_now() <= first_expiry:  # past the lease as first claimed
        time.sleep(0.05)
    (claimed,) = other.claim_due(mailbox=MAILBOX, owner="other", now=T0, limit=10, lease_seconds=60)
    assert claimed.document_id == dropped.document_id  # not `kept`: its lease lives on
    assert store.still_holds(kept.document_id, owner=OWNER, lease_seconds=60)


def test_release_all_hands_back_every_lease_of_an_owner(store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    store.claim_due(mailbox=MAILBOX, owner=OWNER, now=T0, limit=10, lease_seconds=60)
    assert store.release_all(OWNER) == 2
    assert (
        len(store.claim_due(mailbox=MAILBOX, owner="next", now=T0, limit=10, lease_seconds=60)) == 2
    )
    assert store.take_poll_lease(MAILBOX, owner="next", lease_seconds=60)


def test_an_expired_poll_lease_is_taken_over_and_fences_its_owner(
    store_factory: StoreFactory,
) -> None:
    stale, current = store_factory(), store_factory()
    assert stale.take_poll_lease(MAILBOX, owner="stale", lease_seconds=1)
    assert not current.take_poll_lease(MAILBOX, owner="current", lease_seconds=30)
    wait_for_leases_to_expire(stale)
    assert current.take_poll_lease(MAILBOX, owner="current", lease_seconds=30)
    with pytest.raises(LeaseLost):
        stale.record_mails(
            destination=DESTINATION,
            owner="stale",
            mailbox=MAILBOX,
            uidvalidity=UIDVALIDITY,
            mails=[mail(1, accepted(pdf("a")))],
            advance_to=1,
            dedup=DedupMode.CONTENT,
            keep_pdfs=False,
            now=T0,
        )
    with pytest.raises(LeaseLost):
        stale.reset_position(MAILBOX, 99, owner="stale")
    assert current.position(MAILBOX) is None
    assert current.audit(AuditFilter()) == []
    stale.end_poll_lease(MAILBOX, owner="stale")  # hands back nothing that is not its own
    assert not stale.take_poll_lease(MAILBOX, owner="stale", lease_seconds=30)
