"""Several sessions at once (INVOICE_RELAY_SMTP_SESSIONS): every document goes out once,
a session refused as it opens lowers the count instead of failing the call, and each
follower of the arrivals sees every recorded batch."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.documents import OWNER, QUEUE_MAILBOX, add_pending_documents
from tests.fakes import FakeOutbox, FakeStore
from worker.errors import SessionRefused
from worker.models import OutgoingDocument
from worker.relay.background import Arrivals
from worker.relay.forwarding import Forwarder, ForwardRules
from worker.relay.pacer import SendPacer
from worker.relay.sessions import ParallelSessions

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class LockedQueue:
    """The fake store's send queue behind one lock, as a database serialises claims."""

    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self._lock = threading.Lock()

    def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_seconds: float, mailbox: str
    ) -> list[OutgoingDocument]:
        with self._lock:
            return self._store.claim_due(
                now=now, limit=limit, owner=owner, lease_seconds=lease_seconds, mailbox=mailbox
            )

    def mark_forwarded(
        self,
        document_id: int,
        *,
        owner: str,
        message_id: str,
        answer: str,
        now: datetime,
        keep_pdf: bool,
        via: str = "smtp",
    ) -> None:
        with self._lock:
            self._store.mark_forwarded(
                document_id,
                owner=owner,
                message_id=message_id,
                answer=answer,
                now=now,
                keep_pdf=keep_pdf,
                via=via,
            )

    def mark_retry(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        failed: bool,
        via: str = "smtp",
    ) -> None:
        with self._lock:
            self._store.mark_retry(
                document_id,
                owner=owner,
                answer=answer,
                next_attempt_at=next_attempt_at,
                failed=failed,
                via=via,
            )

    def mark_failed(self, document_id: int, *, owner: str, answer: str, via: str = "smtp") -> None:
        with self._lock:
            self._store.mark_failed(document_id, owner=owner, answer=answer, via=via)

    def release(
        self, document_id: int, *, owner: str, answer: str | None = None, via: str = "smtp"
    ) -> None:
        with self._lock:
            self._store.release(document_id, owner=owner, answer=answer, via=via)

    def postpone(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        via: str = "smtp",
    ) -> None:
        with self._lock:
            self._store.postpone(
                document_id,
                owner=owner,
                answer=answer,
                next_attempt_at=next_attempt_at,
                via=via,
            )

    def still_holds(self, document_id: int, *, owner: str, lease_seconds: float) -> bool:
        with self._lock:
            return self._store.still_holds(document_id, owner=owner, lease_seconds=lease_seconds)


def sessions(store: FakeStore, outboxes: list[FakeOutbox]) -> ParallelSessions:
    queue = LockedQueue(store)
    return ParallelSessions(
        [
            Forwarder(
                rules=ForwardRules(
                    mailbox=QUEUE_MAILBOX, send_batch=3, retry_base=timedelta(seconds=10)
                ),
                outbox=outbox,
                store=queue,
                owner=OWNER,
                pacer=SendPacer(None),
                clock=lambda: NOW,
                rng=random.Random(5),
                stop=threading.Event(),
                one_of_several=len(outboxes) > 1,
            )
            for outbox in outboxes
        ]
    )


def sent_hashes(outboxes: list[FakeOutbox]) -> list[str]:
    return sorted(str(mail["X-Invoice-Relay"]) for outbox in outboxes for mail in outbox.sent)


def states(store: FakeStore) -> set[tuple[str, int]]:
    return {(d.state.value, d.attempts) for d in store.documents.values()}


def test_several_sessions_send_every_document_once() -> None:
    store = FakeStore()
    hashes = add_pending_documents(store, 25, now=NOW)
    outboxes = [FakeOutbox() for _ in range(3)]
    assert sessions(store, outboxes).forward_due() == (25, 0, 0)
    assert sent_hashes(outboxes) == sorted(hashes)
    assert states(store) == {("forwarded", 1)}


@pytest.mark.parametrize("refused", [0, 1, 2])
def test_a_session_refused_as_it_opens_leaves_the_work_to_the_others(refused: int) -> None:
    store = FakeStore()
    hashes = add_pending_documents(store, 12, now=NOW)
    outboxes = [FakeOutbox() for _ in range(3)]
    outboxes[refused].refuse_session = True
    assert sessions(store, outboxes).forward_due() == (12, 0, 0)
    assert sent_hashes(outboxes) == sorted(hashes)
    assert outboxes[refused].sent == []


def test_when_every_session_is_refused_the_call_fails_and_nothing_counts() -> None:
    store = FakeStore()
    add_pending_documents(store, 5, now=NOW)
    outboxes = [FakeOutbox() for _ in range(2)]
    for outbox in outboxes:
        outbox.refuse_session = True
    with pytest.raises(SessionRefused):
        sessions(store, outboxes).forward_due()
    assert states(store) == {("pending", 0)}


def test_one_session_is_the_plain_forwarder() -> None:
    store = FakeStore()
    add_pending_documents(store, 2, now=NOW)
    outbox = FakeOutbox()
    outbox.refuse_session = True
    with pytest.raises(SessionRefused):
        sessions(store, [outbox]).forward_due()


def test_the_next_document_is_announced_within_a_batch() -> None:
    store = FakeStore()
    add_pending_documents(store, 4, now=NOW)
    outbox = FakeOutbox()
    sessions(store, [outbox]).forward_due()
    # Batches of 3: the last of a batch is delivered without announcing another.
    assert outbox.followed == [True, True, False, False]


def test_every_follower_sees_every_batch() -> None:
    arrivals = Arrivals()
    followers = [arrivals, arrivals.follower(), arrivals.follower()]
    stop = threading.Event()
    arrivals.recorded()
    assert [follower.wait_for_more(stop) for follower in followers] == [True, True, True]
    arrivals.ended()
    assert [follower.wait_for_more(stop) for follower in followers] == [False, False, False]
