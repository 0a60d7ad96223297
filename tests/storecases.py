"""Mails and PDFs to record in a `SqlStore`, and what the store tests read back from its
tables; the parametrised `store_factory` (SQLite, PostgreSQL) is in tests/unit/conftest.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa

from tests.documents import DESTINATION, OWNER, QUEUE_MAILBOX, poll_owner
from worker.models import (
    DedupMode,
    MailHeaders,
    MailRecord,
    PartRecord,
    RecordedSighting,
    SightingKind,
)
from worker.store.schema import document_contents, documents, sightings
from worker.store.sqlstore import SqlStore

MAILBOX = QUEUE_MAILBOX
UIDVALIDITY = 7
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

StoreFactory = Callable[[], SqlStore]


def pdf(text: str) -> bytes:
    return f"%PDF-1.4 {text}".encode()


def accepted(
    content: bytes,
    *,
    part: str = "2",
    fingerprint: str | None = None,
    invoice_number: str | None = None,
    invoice_number_ambiguous: bool = False,
    filename: str | None = "invoice.pdf",
) -> PartRecord:
    return PartRecord(
        part=part,
        kind=SightingKind.DOCUMENT,
        filename=filename,
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        fingerprint=fingerprint,
        invoice_number=invoice_number,
        invoice_number_ambiguous=invoice_number_ambiguous,
        content=content,
    )


def mail(uid: int, *parts: PartRecord, subject: str = "Invoice") -> MailRecord:
    headers = MailHeaders(
        message_id=f"<{uid}@shop.example>",
        sender="Shop <shop@example.test>",
        sender_address="shop@example.test",
        subject=subject,
        date=datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    return MailRecord(uid=uid, headers=headers, parts=parts)


def record(
    store: SqlStore,
    *mails: MailRecord,
    dedup: DedupMode = DedupMode.CONTENT,
    advance_to: int | None = None,
    now: datetime = T0,
    mailbox: str = MAILBOX,
    destination: str = DESTINATION,
    route: str = "default",
) -> list[RecordedSighting]:
    recorded = store.record_mails(
        destination=destination,
        route=route,
        owner=poll_owner(store, mailbox),
        mailbox=mailbox,
        uidvalidity=UIDVALIDITY,
        mails=mails,
        advance_to=advance_to,
        dedup=dedup,
        keep_pdfs=False,
        now=now,
    )
    # As a poll ends: the leases left are the documents', which the tests watch.
    store.end_poll_lease(mailbox, owner=OWNER)
    return recorded


def sighting_tries(store: SqlStore, sighting_id: int) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sightings.c.tries).where(sightings.c.id == sighting_id)
            ).scalar_one()
        )


def document_content(store: SqlStore, document_id: int) -> bytes | None:
    with store.engine.connect() as connection:
        value = connection.execute(
            sa.select(document_contents.c.content).where(
                document_contents.c.document_id == document_id
            )
        ).scalar_one_or_none()
        return None if value is None else bytes(value)


def document_row(store: SqlStore, document_id: int) -> dict[str, object]:
    with store.engine.connect() as connection:
        return dict(
            connection.execute(sa.select(documents).where(documents.c.id == document_id))
            .mappings()
            .one()
        )
