"""`SqlStore`: the `worker.ports.Store` on SQLAlchemy Core, for SQLite and PostgreSQL.

The database decides uniqueness: sightings and documents are claimed by INSERT ... ON
CONFLICT, and only after a conflict does the store read which row won.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import SQLAlchemyError

from worker.db import (
    READ_ONLY_OPTION,
    advisory_key,
    audit_log,
    documents,
    mailbox_state,
    make_engine,
    sightings,
    translated,
)
from worker.errors import StoreError
from worker.models import (
    AuditFilter,
    AuditRow,
    DedupMode,
    DocumentState,
    MailboxPosition,
    MailRecord,
    Outcome,
    OutgoingDocument,
    PartRecord,
    RecordedSighting,
    SightingKind,
)

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "invoice.pdf"
_LOCATION = ("mailbox", "uidvalidity", "uid", "part")
# Kept from the first sighting when an ERROR row is replaced on a later try.
_KEPT_ON_RETRY = {*_LOCATION, "received_at", "tries"}

Insert = postgresql.Insert | sqlite.Insert


class SqlStore:
    """The relay's SQL store. Every method raises `StoreError` when the database fails."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self._engine = make_engine(url, echo=echo)

    @classmethod
    def from_engine(cls, engine: Engine) -> SqlStore:
        """Wrap an engine made by `worker.db.make_engine` (its SQLite hooks matter)."""
        store = cls.__new__(cls)
        store._engine = engine
        return store

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # --- plumbing --------------------------------------------------------------------

    @property
    def _postgresql(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def _insert(self, table: sa.Table) -> Insert:
        return postgresql.insert(table) if self._postgresql else sqlite.insert(table)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with translated(self._engine.url), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with translated(self._engine.url), self._engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            with connection.begin():
                yield connection

    # --- mailbox position --------------------------------------------------------------

    def position(self, mailbox: str) -> MailboxPosition | None:
        with self._read() as connection:
            row = connection.execute(
                sa.select(mailbox_state.c.uidvalidity, mailbox_state.c.last_uid).where(
                    mailbox_state.c.mailbox == mailbox
                )
            ).one_or_none()
        if row is None:
            return None
        return MailboxPosition(mailbox=mailbox, uidvalidity=row.uidvalidity, last_uid=row.last_uid)

    def reset_position(self, mailbox: str, uidvalidity: int) -> None:
        statement = self._insert(mailbox_state).values(
            mailbox=mailbox, uidvalidity=uidvalidity, last_uid=0, updated_at=_now()
        )
        statement = statement.on_conflict_do_update(
            index_elements=[mailbox_state.c.mailbox],
            set_={
                "uidvalidity": statement.excluded.uidvalidity,
                "last_uid": statement.excluded.last_uid,
                "updated_at": statement.excluded.updated_at,
            },
        )
        with self._write() as connection:
            connection.execute(statement)

    def _advance(
        self, connection: Connection, mailbox: str, uidvalidity: int, last_uid: int, now: datetime
    ) -> None:
        statement = self._insert(mailbox_state).values(
            mailbox=mailbox, uidvalidity=uidvalidity, last_uid=last_uid, updated_at=now
        )
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[mailbox_state.c.mailbox],
            set_={
                "uidvalidity": excluded.uidvalidity,
                "last_uid": excluded.last_uid,
                "updated_at": excluded.updated_at,
            },
            # Never backwards under one UIDVALIDITY; a new UIDVALIDITY starts afresh.
            where=sa.or_(
                mailbox_state.c.uidvalidity != excluded.uidvalidity,
                mailbox_state.c.last_uid < excluded.last_uid,
            ),
        )
        connection.execute(statement)

    # --- recording mail ------------------------------------------------------------------

    def record_mails(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        mails: Sequence[MailRecord],
        advance_to: int | None,
        dedup: DedupMode,
        keep_pdfs: bool,
        now: datetime,
    ) -> list[RecordedSighting]:
        # The bytes of a new document are stored whatever `keep_pdfs` says: a retry must
        # not depend on the mailbox. `keep_pdfs` only matters once it is forwarded.
        del keep_pdfs
        recorded: list[RecordedSighting] = []
        with self._write() as connection:
            for mail in mails:
                if all(part.part for part in mail.parts):
                    self._drop_mail_level_error(connection, mailbox, uidvalidity, mail.uid)
                for part in mail.parts:
                    recorded.append(
                        self._record_part(
                            connection,
                            mailbox=mailbox,
                            uidvalidity=uidvalidity,
                            mail=mail,
                            part=part,
                            dedup=dedup,
                            now=now,
                        )
                    )
            if advance_to is not None:
                self._advance(connection, mailbox, uidvalidity, advance_to, now)
        return recorded

    def _drop_mail_level_error(
        self, connection: Connection, mailbox: str, uidvalidity: int, uid: int
    ) -> None:
        """A mail that failed as a whole has one ERROR row at part "". Once a retry reads
        its parts, that placeholder gives way to one row per part."""
        connection.execute(
            sa.delete(sightings).where(
                sightings.c.mailbox == mailbox,
                sightings.c.uidvalidity == uidvalidity,
                sightings.c.uid == uid,
                sightings.c.part == "",
                sightings.c.kind == SightingKind.ERROR.value,
            )
        )

    def _record_part(
        self,
        connection: Connection,
        *,
        mailbox: str,
        uidvalidity: int,
        mail: MailRecord,
        part: PartRecord,
        dedup: DedupMode,
        now: datetime,
    ) -> RecordedSighting:
        if part.kind is SightingKind.DOCUMENT and (part.sha256 is None or part.content is None):
            raise ValueError(
                f"uid {mail.uid} part {part.part!r}: a DOCUMENT needs sha256 and bytes"
            )
        values: dict[str, Any] = {
            "mailbox": mailbox,
            "uidvalidity": uidvalidity,
            "uid": mail.uid,
            "part": part.part,
            "received_at": now,
            "mail_date": mail.headers.date,
            "message_id": mail.headers.message_id,
            "sender": mail.headers.sender,
            "subject": mail.headers.subject,
            "filename": part.filename,
            "size_bytes": part.size_bytes,
            "sha256": part.sha256,
            "fingerprint": part.fingerprint,
            "invoice_number": part.invoice_number,
            "kind": part.kind.value,
            "reason": part.reason,
            "document_id": None,
            "duplicate_of": None,
            "tries": 1,
        }
        statement = self._insert(sightings).values(values)
        replaced: dict[str, Any] = {
            name: statement.excluded[name] for name in values if name not in _KEPT_ON_RETRY
        }
        replaced["tries"] = sightings.c.tries + 1
        upsert = statement.on_conflict_do_update(
            index_elements=[sightings.c[name] for name in _LOCATION],
            set_=replaced,
            where=sightings.c.kind == SightingKind.ERROR.value,
        ).returning(sightings.c.id)
        sighting_id = connection.execute(upsert).scalar_one_or_none()
        if sighting_id is None:
            return self._existing_sighting(connection, mailbox, uidvalidity, mail.uid, part.part)
        if part.kind is not SightingKind.DOCUMENT:
            return RecordedSighting(
                sighting_id=sighting_id,
                uid=mail.uid,
                part=part.part,
                kind=part.kind,
                reason=part.reason,
                document_id=None,
                duplicate_of=None,
                inserted=True,
            )
        return self._claim_document(
            connection, sighting_id=sighting_id, uid=mail.uid, part=part, dedup=dedup, now=now
        )

    def _existing_sighting(
        self, connection: Connection, mailbox: str, uidvalidity: int, uid: int, part: str
    ) -> RecordedSighting:
        row = connection.execute(
            sa.select(
                sightings.c.id,
                sightings.c.kind,
                sightings.c.reason,
                sightings.c.document_id,
                sightings.c.duplicate_of,
            ).where(
                sightings.c.mailbox == mailbox,
                sightings.c.uidvalidity == uidvalidity,
                sightings.c.uid == uid,
                sightings.c.part == part,
            )
        ).one()
        return RecordedSighting(
            sighting_id=row.id,
            uid=uid,
            part=part,
            kind=SightingKind(row.kind),
            reason=row.reason,
            document_id=row.document_id,
            duplicate_of=row.duplicate_of,
            inserted=False,
        )

    def _claim_document(
        self,
        connection: Connection,
        *,
        sighting_id: int,
        uid: int,
        part: PartRecord,
        dedup: DedupMode,
        now: datetime,
    ) -> RecordedSighting:
        content_key = part.fingerprint if dedup is DedupMode.CONTENT else None
        # No conflict target: a clash on sha256 or on content_key both mean "known".
        claim = (
            self._insert(documents)
            .values(
                sha256=part.sha256,
                fingerprint=part.fingerprint,
                content_key=content_key,
                state=DocumentState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                content=part.content,
                filename=part.filename,
                size_bytes=part.size_bytes,
                resend_count=0,
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(documents.c.id)
        )
        document_id = connection.execute(claim).scalar_one_or_none()
        if document_id is not None:
            connection.execute(
                sa.update(sightings)
                .where(sightings.c.id == sighting_id)
                .values(document_id=document_id)
            )
            return RecordedSighting(
                sighting_id=sighting_id,
                uid=uid,
                part=part.part,
                kind=SightingKind.DOCUMENT,
                reason=part.reason,
                document_id=document_id,
                duplicate_of=None,
                inserted=True,
            )
        document_id, key = self._conflicting_document(connection, part.sha256, content_key)
        introduced_by = connection.execute(
            sa.select(sa.func.min(sightings.c.id)).where(
                sightings.c.document_id == document_id,
                sightings.c.kind == SightingKind.DOCUMENT.value,
            )
        ).scalar_one_or_none()
        reason = f"same {key} as sighting {introduced_by}"
        connection.execute(
            sa.update(sightings)
            .where(sightings.c.id == sighting_id)
            .values(
                kind=SightingKind.DUPLICATE.value,
                reason=reason,
                document_id=document_id,
                duplicate_of=introduced_by,
            )
        )
        return RecordedSighting(
            sighting_id=sighting_id,
            uid=uid,
            part=part.part,
            kind=SightingKind.DUPLICATE,
            reason=reason,
            document_id=document_id,
            duplicate_of=introduced_by,
            inserted=True,
        )

    def _conflicting_document(
        self, connection: Connection, sha256: str | None, content_key: str | None
    ) -> tuple[int, str]:
        """Which document the claim collided with, and by which key (sha256 first)."""
        by_sha = connection.execute(
            sa.select(documents.c.id).where(documents.c.sha256 == sha256)
        ).scalar_one_or_none()
        if by_sha is not None:
            return by_sha, "sha256"
        if content_key is not None:
            by_content = connection.execute(
                sa.select(documents.c.id).where(documents.c.content_key == content_key)
            ).scalar_one_or_none()
            if by_content is not None:
                return by_content, "content fingerprint"
        raise StoreError(f"document {sha256} conflicted with no visible document")

    def error_uids(self, *, mailbox: str, uidvalidity: int, max_tries: int) -> list[int]:
        with self._read() as connection:
            uids = connection.execute(
                sa.select(sightings.c.uid)
                .distinct()
                .where(
                    sightings.c.mailbox == mailbox,
                    sightings.c.uidvalidity == uidvalidity,
                    sightings.c.kind == SightingKind.ERROR.value,
                    sightings.c.tries < max_tries,
                )
                .order_by(sightings.c.uid)
            ).scalars()
            return [int(uid) for uid in uids]

    def reject_exhausted_errors(self, *, mailbox: str, max_tries: int) -> int:
        reason = (
            sa.literal("gave up after ")
            + sa.cast(sightings.c.tries, sa.Text)
            + sa.literal(" tries: ")
            + sa.func.coalesce(sightings.c.reason, "")
        )
        with self._write() as connection:
            result = connection.execute(
                sa.update(sightings)
                .where(
                    sightings.c.mailbox == mailbox,
                    sightings.c.kind == SightingKind.ERROR.value,
                    sightings.c.tries >= max_tries,
                )
                .values(kind=SightingKind.REJECTED.value, reason=reason)
            )
            return result.rowcount

    # --- sending -------------------------------------------------------------------------

    def claim_due(
        self, *, now: datetime, limit: int, lease_seconds: float
    ) -> list[OutgoingDocument]:
        due = (
            sa.select(documents.c.id)
            .where(
                documents.c.state == DocumentState.PENDING.value,
                documents.c.next_attempt_at <= now,
                sa.or_(documents.c.lease_until.is_(None), documents.c.lease_until <= now),
                documents.c.content.is_not(None),
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
                .values(lease_until=now + timedelta(seconds=lease_seconds))
            )
            rows = connection.execute(
                sa.select(
                    documents.c.id,
                    documents.c.sha256,
                    documents.c.content,
                    documents.c.filename,
                    documents.c.attempts,
                    documents.c.resend_count,
                    sightings.c.sender,
                    sightings.c.subject,
                    sightings.c.mail_date,
                    sightings.c.message_id,
                )
                .select_from(documents.outerjoin(sightings, introducing))
                .where(documents.c.id.in_(ids))
                .order_by(documents.c.id)
            ).all()
        return [_outgoing(row) for row in rows]

    def mark_forwarded(
        self, document_id: int, *, message_id: str, answer: str, now: datetime, keep_pdf: bool
    ) -> None:
        values: dict[str, Any] = {
            "state": DocumentState.FORWARDED.value,
            "attempts": documents.c.attempts + 1,
            "lease_until": None,
            "forwarded_message_id": message_id,
            "forwarded_at": now,
            "last_answer": answer,
        }
        if not keep_pdf:
            values["content"] = None
        self._update_document(document_id, values)

    def mark_retry(
        self, document_id: int, *, answer: str, next_attempt_at: datetime, failed: bool
    ) -> None:
        values: dict[str, Any] = {
            "attempts": documents.c.attempts + 1,
            "lease_until": None,
            "last_answer": answer,
            "next_attempt_at": next_attempt_at,
        }
        if failed:
            values["state"] = DocumentState.FAILED.value
        self._update_document(document_id, values)

    def mark_failed(self, document_id: int, *, answer: str) -> None:
        self._update_document(
            document_id,
            {
                "state": DocumentState.FAILED.value,
                "attempts": documents.c.attempts + 1,
                "lease_until": None,
                "last_answer": answer,
            },
        )

    def release(self, document_id: int) -> None:
        self._update_document(document_id, {"lease_until": None})

    def _update_document(self, document_id: int, values: dict[str, Any]) -> None:
        with self._write() as connection:
            connection.execute(
                sa.update(documents).where(documents.c.id == document_id).values(values)
            )

    def requeue(self, *, sha256: str | None, now: datetime) -> int:
        """FAILED documents back to PENDING with a fresh count of attempts."""
        statement = (
            sa.update(documents)
            .where(documents.c.state == DocumentState.FAILED.value)
            .values(
                state=DocumentState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                lease_until=None,
            )
        )
        if sha256 is not None:
            statement = statement.where(documents.c.sha256 == sha256)
        with self._write() as connection:
            return connection.execute(statement).rowcount

    def resend(self, *, sha256: str, now: datetime) -> bool:
        statement = (
            sa.update(documents)
            .where(
                documents.c.sha256 == sha256,
                documents.c.state == DocumentState.FORWARDED.value,
                documents.c.content.is_not(None),
            )
            .values(
                state=DocumentState.PENDING.value,
                resend_count=documents.c.resend_count + 1,
                next_attempt_at=now,
                lease_until=None,
            )
        )
        with self._write() as connection:
            return connection.execute(statement).rowcount == 1

    # --- reading -------------------------------------------------------------------------

    def state_counts(self) -> dict[DocumentState, int]:
        counts = dict.fromkeys(DocumentState, 0)
        with self._read() as connection:
            for state, count in connection.execute(
                sa.select(documents.c.state, sa.func.count()).group_by(documents.c.state)
            ):
                counts[DocumentState(state)] = int(count)
        return counts

    def audit(self, query: AuditFilter) -> list[AuditRow]:
        """Rows of the `audit_log` view, newest first."""
        statement = sa.select(audit_log).order_by(
            audit_log.c.received_at.desc(), audit_log.c.id.desc()
        )
        if query.since is not None:
            statement = statement.where(audit_log.c.received_at >= query.since)
        if query.outcomes:
            statement = statement.where(
                audit_log.c.outcome.in_([outcome.value for outcome in query.outcomes])
            )
        if query.invoice_number is not None:
            statement = statement.where(audit_log.c.invoice_number == query.invoice_number)
        if query.limit is not None:
            statement = statement.limit(query.limit)
        with self._read() as connection:
            rows = connection.execute(statement).all()
        return [_audit_row(row) for row in rows]

    # --- locking -------------------------------------------------------------------------

    @contextmanager
    def poll_lock(self, mailbox: str) -> Iterator[bool]:
        """Hold this mailbox's poll lock while the block runs; yields False when another
        replica holds it. PostgreSQL: a session advisory lock on a dedicated connection.
        SQLite: always True (one host; BEGIN IMMEDIATE serialises the writes)."""
        if not self._postgresql:
            yield True
            return
        key = advisory_key(f"invoice-relay:poll:{mailbox}")
        with translated(self._engine.url):
            connection = self._engine.connect()
        try:
            with translated(self._engine.url):
                acquired = bool(
                    connection.execute(
                        sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
                    ).scalar_one()
                )
                connection.commit()
            try:
                yield acquired
            finally:
                if acquired:
                    _unlock(connection, key)
        finally:
            connection.close()


def _unlock(connection: Connection, key: int) -> None:
    try:
        connection.rollback()
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        connection.commit()
    except SQLAlchemyError:
        # Closing the session releases the lock; never hand it back to the pool.
        log.warning("poll lock release failed; dropping the connection", exc_info=True)
        connection.invalidate()


def _now() -> datetime:
    return datetime.now().astimezone()


def _outgoing(row: Row[*tuple[Any, ...]]) -> OutgoingDocument:
    return OutgoingDocument(
        document_id=row.id,
        sha256=row.sha256,
        content=bytes(row.content),
        filename=row.filename or DEFAULT_FILENAME,
        attempts=row.attempts,
        resend_count=row.resend_count,
        original_sender=row.sender or "",
        original_subject=row.subject or "",
        original_date=row.mail_date,
        original_message_id=row.message_id or "",
    )


def _audit_row(row: Row[*tuple[Any, ...]]) -> AuditRow:
    return AuditRow(
        id=row.id,
        received_at=row.received_at,
        mail_date=row.mail_date,
        mailbox=row.mailbox,
        uidvalidity=row.uidvalidity,
        uid=row.uid,
        message_id=row.message_id,
        sender=row.sender,
        subject=row.subject,
        filename=row.filename,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        fingerprint=row.fingerprint,
        invoice_number=row.invoice_number,
        outcome=Outcome(row.outcome),
        reason=row.reason,
        duplicate_of=row.duplicate_of,
        forwarded_at=row.forwarded_at,
        forwarded_message_id=row.forwarded_message_id,
        attempts=row.attempts,
    )
