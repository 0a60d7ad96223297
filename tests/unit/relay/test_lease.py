"""The heartbeat that keeps a live owner's leases, and the forwarder's fencing: a sender
whose claim was taken over does not end its mail, and a stopping one does not sit out
the pacer's window."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.documents import OWNER, QUEUE_MAILBOX, add_pending_documents, send_loop
from tests.fakes import FakeOutbox
from worker.errors import LeaseLost, StoreError
from worker.faults import CrashPoint
from worker.relay.lease import Heartbeat, new_owner
from worker.relay.pacer import SendPacer
from worker.store import schema
from worker.store.sqlstore import SqlStore

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WAIT = 10.0


class CountingRenewer:
    """Counts renewals; the first `failures` raise as a database that is away would."""

    def __init__(self, *, failures: int = 0, enough: int = 3) -> None:
        self.calls: list[tuple[str, float]] = []
        self.failures = failures
        self.enough = enough
        self.renewed_enough = threading.Event()

    def renew(self, owner: str, *, lease_seconds: float) -> int:
        self.calls.append((owner, lease_seconds))
        if len(self.calls) <= self.failures:
            raise StoreError("connection refused")
        if len(self.calls) >= self.enough:
            self.renewed_enough.set()
        return 1


@pytest.mark.parametrize(("lease", "interval"), [(30.0, 30.0), (30.0, 45.0), (30.0, 0.0)])
def test_a_heartbeat_beats_more_often_than_a_lease_lasts(lease: float, interval: float) -> None:
    with pytest.raises(ValueError, match="more often"):
        Heartbeat(CountingRenewer(), "owner", lease_seconds=lease, interval=interval)


@pytest.mark.parametrize("failures", [0, 2], ids=["healthy", "database away twice"])
def test_a_heartbeat_renews_its_owners_leases_until_stopped(failures: int) -> None:
    renewer = CountingRenewer(failures=failures, enough=failures + 3)
    heartbeat = Heartbeat(renewer, "owner-1", lease_seconds=1.0, interval=0.01).start()
    try:
        assert renewer.renewed_enough.wait(WAIT)
    finally:
        heartbeat.stop()
    assert set(renewer.calls) == {("owner-1", 1.0)}


def test_owners_are_random_tokens() -> None:
    owners = {new_owner() for _ in range(100)}
    assert len(owners) == 100
    assert all(len(owner) == 32 for owner in owners)


def test_a_sender_whose_claim_was_taken_over_does_not_end_its_mail(store: SqlStore) -> None:
    # The owner froze right after its claim, past the lease; another process took the
    # document over. Resumed, it must not complete the mail: the check before the end
    # fails and the mail is abandoned (the SMTP adapter then sends no final dot).
    add_pending_documents(store, 1, now=NOW)
    outbox = FakeOutbox()

    def frozen_past_the_lease(point: CrashPoint) -> None:
        if point is CrashPoint.AFTER_CLAIM:
            with store.engine.begin() as connection:
                connection.execute(
                    sa.update(schema.documents).values(lease_until=datetime(2000, 1, 1, tzinfo=UTC))
                )
            assert store.claim_due(
                mailbox=QUEUE_MAILBOX, now=NOW, limit=10, owner="other", lease_seconds=60
            )

    relay = send_loop(store, outbox, now=NOW, send_batch=5, checkpoint=frozen_past_the_lease)
    with pytest.raises(LeaseLost):
        relay.forward_due()
    assert outbox.sent == []
    with store.engine.connect() as connection:
        owner, state, attempts = connection.execute(
            sa.select(
                schema.documents.c.lease_owner,
                schema.documents.c.state,
                schema.documents.c.attempts,
            )
        ).one()
    assert (owner, state, attempts) == ("other", "pending", 0)  # the stale owner wrote nothing
    assert OWNER != "other"


def test_a_stop_ends_the_pacers_wait_at_once() -> None:
    stop = threading.Event()
    pacer = SendPacer(1, stop=stop)
    assert pacer.wait()  # the first send of the minute goes at once
    waiting = threading.Thread(target=lambda: results.append(pacer.wait()))
    results: list[bool] = []
    waiting.start()
    stop.set()
    waiting.join(WAIT)
    assert not waiting.is_alive()  # not the 60 s window
    assert results == [False]  # and the send it paced does not go
