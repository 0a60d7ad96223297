"""Pending documents written straight into a store (SQL, or the in-memory FakeStore), and
the send loop that sends them, for tests of forwarding."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import sqlalchemy as sa

from tests.fakes import FakeStore
from worker.faults import Checkpoint, no_checkpoint
from worker.models import DocumentState
from worker.relay.forwarding import Forwarder, ForwardRules
from worker.relay.pacer import SendPacer
from worker.relay.ports import Destination, SendQueue
from worker.store import schema
from worker.store.sqlstore import SqlStore

# The lease owner of the tests that write under a lease straight into a store: a fixed
# token, where a process draws a random one (`worker.relay.lease.new_owner`).
OWNER = "tests"
# The folder and destination of the documents these helpers write: a document is sent
# only by a poll of the folder that introduced it (`claim_due(mailbox=...)`).
QUEUE_MAILBOX = "relay@example.test/INBOX"
DESTINATION = "smtp:accounting@example.test"


class PollLeases(Protocol):
    """The poll-lease half of `SqlStore` that `FakeStore` has too."""

    def take_poll_lease(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool: ...

    def end_poll_lease(self, mailbox: str, *, owner: str) -> None: ...


def poll_owner(store: PollLeases, mailbox: str) -> str:
    """OWNER, holding (or renewed in) the poll lease of `mailbox`, which writes of a poll
    need. Five minutes: longer than any test that records."""
    if not store.take_poll_lease(mailbox, owner=OWNER, lease_seconds=300):
        raise AssertionError(f"another owner holds the poll lease of {mailbox}")
    return OWNER


def latest_lease_expiry(store: SqlStore) -> datetime | None:
    """When the last lease held now (of a document or a mailbox) expires, or None."""
    with store.engine.connect() as connection:
        documents = connection.execute(sa.select(sa.func.max(schema.documents.c.lease_until)))
        polls = connection.execute(sa.select(sa.func.max(schema.poll_leases.c.expires_at)))
        found = [documents.scalar_one(), polls.scalar_one()]
    # SQLite hands back the text of a computed MAX; the column type parses it.
    parsed = [_instant(value) for value in found if value is not None]
    return max(parsed, default=None)


def _instant(value: datetime | str) -> datetime:
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def wait_for_leases_to_expire(store: SqlStore, *, timeout: float = 120.0) -> float:
    """Block until the database's clock is past every lease held now (as a process that
    died holding them would have to wait); returns the seconds waited. A condition on the
    database's clock, polled: leases expire there, not on this host's clock."""
    started = time.monotonic()
    expiry = latest_lease_expiry(store)
    while expiry is not None and store.database_now() <= expiry:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"the leases did not expire within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def add_pending_documents(
    store: SqlStore | FakeStore,
    count: int,
    *,
    now: datetime,
    mailbox: str = QUEUE_MAILBOX,
    destination: str = DESTINATION,
) -> list[str]:
    """`count` pending documents of `mailbox` due at `now`; returns their SHA-256s in
    order."""
    hashes = [hashlib.sha256(f"pdf {n}".encode()).hexdigest() for n in range(count)]
    if isinstance(store, FakeStore):
        for sha256 in hashes:
            store.add_document(
                sha256=sha256,
                content=b"%PDF-1.4 " + sha256.encode(),
                filename="invoice.pdf",
                now=now,
                mailbox=mailbox,
                destination=destination,
            )
        return hashes
    with store.engine.begin() as connection:
        for sha256 in hashes:
            document_id = connection.execute(
                sa.insert(schema.documents)
                .values(
                    sha256=sha256,
                    state=DocumentState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    filename="invoice.pdf",
                    resend_count=0,
                    created_at=now,
                    mailbox=mailbox,
                    destination=destination,
                )
                .returning(schema.documents.c.id)
            ).scalar_one()
            connection.execute(
                sa.insert(schema.document_contents).values(
                    document_id=document_id, content=b"%PDF-1.4 " + sha256.encode()
                )
            )
    return hashes


def send_loop(
    store: SendQueue,
    outbox: Destination,
    *,
    now: datetime,
    send_batch: int,
    stop: threading.Event | None = None,
    checkpoint: Checkpoint = no_checkpoint,
    pacer: SendPacer | None = None,
    via: str = "smtp",
    mailbox: str = QUEUE_MAILBOX,
) -> Forwarder:
    """A `Forwarder` for tests: a fixed clock, no pacing unless given, retries 10 s
    apart (±20 %)."""
    return Forwarder(
        rules=ForwardRules(
            mailbox=mailbox,
            send_batch=send_batch,
            retry_base=timedelta(seconds=10),
            via=via,
        ),
        outbox=outbox,
        store=store,
        owner=OWNER,
        pacer=pacer or SendPacer(None),
        clock=lambda: now,
        rng=random.Random(3),
        stop=stop or threading.Event(),
        checkpoint=checkpoint,
    )
