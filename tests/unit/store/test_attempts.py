"""SqlStore's history of delivery attempts (`delivery_attempts`), against SQLite and
PostgreSQL (`integration`): one row per mark, on the database's clock, written only
under the lease, cleaned, and bounded per document."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.documents import OWNER, QUEUE_MAILBOX
from tests.storecases import T0, StoreFactory, accepted, document_row, mail, pdf, record
from worker.errors import LeaseLost
from worker.models import KEPT_ATTEMPTS, AttemptOutcome, DeliveryAttempt, RouteScope
from worker.store.attempts import ANSWER_LIMIT
from worker.store.sqlstore import SqlStore

EVERYONE = RouteScope.everything()


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


def history(store: SqlStore, sighting_id: int) -> tuple[DeliveryAttempt, ...]:
    story = store.document_story(sighting_id, EVERYONE)
    assert story is not None
    return story.attempt_history


def claim_one(store: SqlStore, owner: str = OWNER) -> int:
    (claimed,) = store.claim_due(
        mailbox=QUEUE_MAILBOX, now=T0 + timedelta(days=1), limit=10, owner=owner, lease_seconds=60
    )
    return claimed.document_id


def test_every_mark_is_one_attempt_on_the_databases_clock(store: SqlStore) -> None:
    (seen,) = record(store, mail(1, accepted(pdf("a"))))
    before = store.database_now()
    store.release(claim_one(store), owner=OWNER)  # claimed, not begun: no attempt
    store.release(claim_one(store), owner=OWNER, answer="SMTP relay:25: connection refused")
    store.postpone(
        claim_one(store),
        owner=OWNER,
        answer="pending: uploads per hour; resumes 2025-03-02 13:00 UTC",
        next_attempt_at=T0,
        via="getmyinvoices",
    )
    store.mark_retry(
        claim_one(store),
        owner=OWNER,
        answer="451 4.3.0 try later",
        next_attempt_at=T0,
        failed=False,
    )
    document_id = claim_one(store)
    store.mark_forwarded(
        document_id,
        owner=OWNER,
        message_id="<out@relay>",
        answer="250 2.0.0 queued as 4F2A",
        now=T0,
        keep_pdf=False,
    )
    after = store.database_now()

    attempts = history(store, seen.sighting_id)
    assert [(a.outcome, a.answer, a.via) for a in attempts] == [
        (AttemptOutcome.RELEASED, "SMTP relay:25: connection refused", "smtp"),
        (
            AttemptOutcome.HELD,
            "pending: uploads per hour; resumes 2025-03-02 13:00 UTC",
            "getmyinvoices",
        ),
        (AttemptOutcome.RETRY, "451 4.3.0 try later", "smtp"),
        (AttemptOutcome.FORWARDED, "250 2.0.0 queued as 4F2A", "smtp"),
    ]
    # The database's clock, not the caller's `now` (T0, a year before).
    times = [attempt.attempted_at for attempt in attempts]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    # Held and released tries are kept but not counted.
    assert document_row(store, document_id)["attempts"] == 2


def test_a_refusal_for_good_and_the_last_allowed_attempt_are_failed(store: SqlStore) -> None:
    first, second = record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    claimed = store.claim_due(
        mailbox=QUEUE_MAILBOX, now=T0, limit=10, owner=OWNER, lease_seconds=60
    )
    assert first.document_id is not None and second.document_id is not None
    assert {item.document_id for item in claimed} == {first.document_id, second.document_id}
    store.mark_failed(first.document_id, owner=OWNER, answer="554 5.7.1 refused", via="smtp")
    store.mark_retry(
        second.document_id, owner=OWNER, answer="452 full", next_attempt_at=T0, failed=True
    )
    assert [(a.outcome, a.answer) for a in history(store, first.sighting_id)] == [
        (AttemptOutcome.FAILED, "554 5.7.1 refused")
    ]
    assert [(a.outcome, a.answer) for a in history(store, second.sighting_id)] == [
        (AttemptOutcome.FAILED, "452 full")
    ]


def test_a_write_without_the_lease_records_no_attempt(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    (seen,) = record(store, mail(1, accepted(pdf("a"))))
    document_id = claim_one(store)
    # Another owner never held this lease; the holder's own lease ends with its release.
    with pytest.raises(LeaseLost):
        other.mark_failed(document_id, owner="other", answer="554 from the stale one")
    store.release(document_id, owner=OWNER, answer="421 closing")
    with pytest.raises(LeaseLost):
        store.mark_retry(
            document_id, owner=OWNER, answer="451 late", next_attempt_at=T0, failed=False
        )
    with pytest.raises(LeaseLost):
        store.postpone(document_id, owner=OWNER, answer="held late", next_attempt_at=T0)
    assert [(a.outcome, a.answer) for a in history(store, seen.sighting_id)] == [
        (AttemptOutcome.RELEASED, "421 closing")
    ]


def test_answers_are_kept_as_one_capped_line(store: SqlStore) -> None:
    # A session's failure may carry a library's own text (only the attempt keeps it).
    (seen,) = record(store, mail(1, accepted(pdf("a"))))
    store.release(
        claim_one(store),
        owner=OWNER,
        answer="SMTP first line\r\n<b>second</b>\x00 " + "x" * (2 * ANSWER_LIMIT),
    )
    (attempt,) = history(store, seen.sighting_id)
    assert attempt.answer.startswith("SMTP first line <b>second</b>")
    assert "\n" not in attempt.answer and "\x00" not in attempt.answer
    assert len(attempt.answer) == ANSWER_LIMIT


def test_a_document_keeps_its_last_attempts_only(store: SqlStore) -> None:
    kept, other = record(store, mail(1, accepted(pdf("a"))), mail(2, accepted(pdf("b"))))
    tries = KEPT_ATTEMPTS + 5
    for number in range(1, tries + 1):
        for claimed in store.claim_due(
            mailbox=QUEUE_MAILBOX, now=T0, limit=10, owner=OWNER, lease_seconds=60
        ):
            answer = f"451 try {number}" if claimed.document_id == kept.document_id else "451"
            store.mark_retry(
                claimed.document_id,
                owner=OWNER,
                answer=answer,
                next_attempt_at=T0,
                failed=False,
            )
    attempts = history(store, kept.sighting_id)
    assert [a.answer for a in attempts] == [f"451 try {number}" for number in range(6, tries + 1)]
    assert kept.document_id is not None
    assert document_row(store, kept.document_id)["attempts"] == tries  # the count goes on
    assert len(history(store, other.sighting_id)) == KEPT_ATTEMPTS  # each its own bound
