"""The forwarding queue: lease due documents (FOR UPDATE SKIP LOCKED on PostgreSQL,
BEGIN IMMEDIATE on SQLite) and record what the destination answered, each record only
while the lease is still the recorder's (`worker.store.leases`), together with the
attempt it was (`worker.store.attempts`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from worker.errors import LeaseLost
from worker.models import (
    AttemptOutcome,
    DeliveryKind,
    DocumentState,
    OutgoingDocument,
    SightingKind,
)
from worker.store.attempts import record_attempt
from worker.store.leases import LeaseQueries, lease_held
from worker.store.schema import document_contents, documents, sightings

DEFAULT_FILENAME = "invoice.pdf"
SMTP = DeliveryKind.SMTP.value


class DocumentQueue(LeaseQueries):
    """The queries of `worker.relay.ports.SendQueue` (and `AdminStore`) that send documents
    and change their state, each only while the document's lease is the caller's."""

    def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_seconds: float, mailbox: str
    ) -> list[OutgoingDocument]:
        # `now` (the caller's clock) says which retries are due; leases live on the
        # database's clock, the one every replica shares. Only documents `mailbox`
        # introduced: a document is delivered by the route whose mail introduced it.
        due = (
            sa.select(documents.c.id)
            .where(
                documents.c.mailbox == mailbox,
                documents.c.state == DocumentState.PENDING.value,
                documents.c.next_attempt_at <= now,
                sa.or_(
                    documents.c.lease_until.is_(None),
                    documents.c.lease_until <= self._db_now(),
                ),
                has_content(),
            )
            .order_by(documents.c.id)
            .limit(limit)
        )
        if self._postgresql:
            due = due.with_for_update(skip_locked=True)
        introducing = sa.and_(
            sightings.c.document_id == documents.c.id,
            sightings.c.kind == SightingKind.DOCUMENT.value,
        )
        with self._write() as connection:
            ids = list(connection.execute(due).scalars())
            if not ids:
                return []
            connection.execute(
                sa.update(documents)
                .where(documents.c.id.in_(ids))
                .values(lease_until=self._db_now(lease_seconds), lease_owner=owner)
            )
            rows = connection.execute(
                sa.select(
                    documents.c.id,
                    documents.c.sha256,
                    self._selected_content().label("content"),
                    documents.c.filename,
                    documents.c.attempts,
                    documents.c.resend_count,
                    sightings.c.sender,
                    sightings.c.subject,
                    sightings.c.mail_date,
                    sightings.c.message_id,
                    sightings.c.invoice_number,
                    sightings.c.invoice_number_ambiguous,
                    sightings.c.credit_note,
                    documents.c.upload_started_at,
                    documents.c.destination,
                )
                .select_from(
                    documents.join(
                        document_contents, document_contents.c.document_id == documents.c.id
                    ).outerjoin(sightings, introducing)
                )
                .where(documents.c.id.in_(ids))
                .order_by(documents.c.id)
            ).all()
            return [
                _outgoing(
                    row,
                    row.content
                    if row.content is not None
                    else self._read_content(connection, row.id),
                )
                for row in rows
            ]

    def mark_forwarded(
        self,
        document_id: int,
        *,
        owner: str,
        message_id: str,
        answer: str,
        now: datetime,
        keep_pdf: bool,
        via: str = SMTP,
    ) -> None:
        values: dict[str, Any] = {
            "state": DocumentState.FORWARDED.value,
            "attempts": documents.c.attempts + 1,
            # No mail was forwarded through an API: its id is the delivery id alone.
            "forwarded_message_id": message_id if via == SMTP else None,
            "forwarded_at": now,
            "last_answer": answer,
            "delivered_via": via,
            "delivery_id": message_id,
            "held_reason": None,
        }
        self._update_document(
            document_id,
            owner,
            values,
            drop_content=not keep_pdf,
            attempt=(AttemptOutcome.FORWARDED, answer, via),
        )

    def mark_retry(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        failed: bool,
        via: str = SMTP,
    ) -> None:
        values: dict[str, Any] = {
            "attempts": documents.c.attempts + 1,
            "last_answer": answer,
            "next_attempt_at": next_attempt_at,
            "held_reason": None,
        }
        if failed:
            values["state"] = DocumentState.FAILED.value
        outcome = AttemptOutcome.FAILED if failed else AttemptOutcome.RETRY
        self._update_document(document_id, owner, values, attempt=(outcome, answer, via))

    def mark_failed(self, document_id: int, *, owner: str, answer: str, via: str = SMTP) -> None:
        self._update_document(
            document_id,
            owner,
            {
                "state": DocumentState.FAILED.value,
                "attempts": documents.c.attempts + 1,
                "last_answer": answer,
                "held_reason": None,
            },
            attempt=(AttemptOutcome.FAILED, answer, via),
        )

    def release(
        self, document_id: int, *, owner: str, answer: str | None = None, via: str = SMTP
    ) -> None:
        """The lease ends, nothing else changes; with `answer` (why the session could
        not take the document) the try is kept as a `released` attempt."""
        attempt = None if answer is None else (AttemptOutcome.RELEASED, answer, via)
        self._update_document(document_id, owner, {}, attempt=attempt)

    def postpone(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        via: str = SMTP,
    ) -> None:
        """A limit of the destination: due again later, no attempt counted (but kept,
        as `held`)."""
        self._update_document(
            document_id,
            owner,
            {
                "last_answer": answer,
                "next_attempt_at": next_attempt_at,
                "held_reason": answer,
            },
            attempt=(AttemptOutcome.HELD, answer, via),
        )

    def mark_upload_started(
        self, sha256: str, *, now: datetime, destination: str | None = None
    ) -> None:
        """Before an API upload goes out (kept once set: the first start is the one that
        may have arrived). `destination` is the parcel's: None for a document older
        than destinations."""
        bound_for = (
            documents.c.destination.is_(None)
            if destination is None
            else documents.c.destination == destination
        )
        with self._write() as connection:
            connection.execute(
                sa.update(documents)
                .where(
                    documents.c.sha256 == sha256,
                    bound_for,
                    documents.c.upload_started_at.is_(None),
                )
                .values(upload_started_at=now)
            )

    def _update_document(
        self,
        document_id: int,
        owner: str,
        values: dict[str, Any],
        *,
        drop_content: bool = False,
        attempt: tuple[AttemptOutcome, str, str] | None = None,
    ) -> None:
        """One leased document's new values with its lease ended, its PDF dropped with
        them when asked, and `attempt` (outcome, answer, via) recorded; `LeaseLost`, and
        nothing changed or recorded, when the lease is no longer `owner`'s."""
        with self._write() as connection:
            changed = connection.execute(
                sa.update(documents)
                .where(lease_held(document_id, owner, self._db_now()))
                .values({**values, "lease_until": None, "lease_owner": None})
            ).rowcount
            if changed != 1:
                raise LeaseLost(f"document {document_id}")
            if attempt is not None:
                outcome, answer, via = attempt
                record_attempt(
                    connection,
                    document_id=document_id,
                    outcome=outcome,
                    answer=answer,
                    via=via,
                    attempted_at=self._db_now(),
                )
            if drop_content:
                connection.execute(
                    sa.delete(document_contents).where(
                        document_contents.c.document_id == document_id
                    )
                )


def has_content() -> sa.ColumnElement[bool]:
    """The document's PDF is still stored (not dropped after forwarding)."""
    return (
        sa.select(document_contents.c.document_id)
        .where(document_contents.c.document_id == documents.c.id)
        .exists()
    )


def _outgoing(row: Row[*tuple[Any, ...]], content: bytes) -> OutgoingDocument:
    return OutgoingDocument(
        document_id=row.id,
        sha256=row.sha256,
        content=bytes(content),
        filename=row.filename or DEFAULT_FILENAME,
        attempts=row.attempts,
        resend_count=row.resend_count,
        original_sender=row.sender or "",
        original_subject=row.subject or "",
        original_date=row.mail_date,
        original_message_id=row.message_id or "",
        invoice_number=row.invoice_number,
        invoice_number_ambiguous=bool(row.invoice_number_ambiguous),
        credit_note=bool(row.credit_note),
        upload_started=row.upload_started_at is not None,
        destination=row.destination,
    )
