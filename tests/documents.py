"""Pending documents written straight into a store (SQL, or the in-memory FakeStore), and
the send loop that sends them, for tests of forwarding."""

from __future__ import annotations

import hashlib
import random
import threading
from datetime import datetime, timedelta

import sqlalchemy as sa

from tests.fakes import FakeStore
from worker.faults import Checkpoint, no_checkpoint
from worker.models import DocumentState
from worker.relay.forwarding import Forwarder, ForwardRules
from worker.relay.pacer import SendPacer
from worker.relay.ports import Destination, SendQueue
from worker.store import schema
from worker.store.sqlstore import SqlStore


def add_pending_documents(store: SqlStore | FakeStore, count: int, *, now: datetime) -> list[str]:
    """`count` pending documents due at `now`; returns their SHA-256s in order."""
    hashes = [hashlib.sha256(f"pdf {n}".encode()).hexdigest() for n in range(count)]
    if isinstance(store, FakeStore):
        for sha256 in hashes:
            store.add_document(
                sha256=sha256,
                content=b"%PDF-1.4 " + sha256.encode(),
                filename="invoice.pdf",
                now=now,
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
) -> Forwarder:
    """A `Forwarder` for tests: a fixed clock, no pacing unless given, retries 10 s
    apart (±20 %)."""
    return Forwarder(
        rules=ForwardRules(
            send_batch=send_batch,
            retry_base=timedelta(seconds=10),
        ),
        outbox=outbox,
        store=store,
        pacer=pacer or SendPacer(None),
        clock=lambda: now,
        rng=random.Random(3),
        stop=stop or threading.Event(),
        checkpoint=checkpoint,
    )
