"""Pending documents written straight into a store, for tests of the send loop."""

from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa

from worker import db
from worker.models import DocumentState
from worker.store import SqlStore


def add_pending_documents(store: SqlStore, count: int, *, now: datetime) -> list[str]:
    """`count` pending documents due at `now`; returns their SHA-256s in order."""
    hashes = [hashlib.sha256(f"pdf {n}".encode()).hexdigest() for n in range(count)]
    with store.engine.begin() as connection:
        for sha256 in hashes:
            document_id = connection.execute(
                sa.insert(db.documents)
                .values(
                    sha256=sha256,
                    state=DocumentState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    filename="invoice.pdf",
                    resend_count=0,
                    created_at=now,
                )
                .returning(db.documents.c.id)
            ).scalar_one()
            connection.execute(
                sa.insert(db.document_contents).values(
                    document_id=document_id, content=b"%PDF-1.4 " + sha256.encode()
                )
            )
    return hashes
