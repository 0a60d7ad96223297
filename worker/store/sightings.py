"""Recording mail: the mailbox position and one sighting per part, with documents
claimed by INSERT ... ON CONFLICT so the database decides what is new."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.errors import StoreError
from worker.models import (
    DEFAULT_ROUTE,
    DedupMode,
    DocumentState,
    MailboxPosition,
    MailRecord,
    PartRecord,
    RecordedSighting,
    SightingKind,
)
from worker.store.dedup import claim_statement, known_document
from worker.store.leases import LeaseQueries
from worker.store.schema import documents, mailbox_state, sightings

_LOCATION = ("mailbox", "uidvalidity", "uid", "part")
# Kept from the first sighting when an ERROR row is replaced on a later try.
_KEPT_ON_RETRY = {*_LOCATION, "received_at", "tries"}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Statements:
    """The statements `record_mails` runs once per part, built once per batch."""

    sighting: sa.Executable
    claim: sa.Executable
    link: sa.Executable


@dataclass(frozen=True, slots=True, kw_only=True)
class _EarlierTries:
    """What a mail-level error row leaves to the part rows that replace it."""

    tries: int
    received_at: datetime


class MailRecorder(LeaseQueries):
    """The queries of `worker.relay.ports.PollStore` that record what a poll read, each
    only while the poll lease is the recorder's."""

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

    def reset_position(self, mailbox: str, uidvalidity: int, *, owner: str) -> None:
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
            self._fence_poll(connection, mailbox, owner)
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
        owner: str,
        destination: str,
        route: str = DEFAULT_ROUTE,
    ) -> list[RecordedSighting]:
        # The bytes of a new document are stored whatever `keep_pdfs` says: a retry must
        # not depend on the mailbox. `keep_pdfs` only matters once it is forwarded.
        del keep_pdfs
        for mail in mails:
            for part in mail.parts:
                if part.kind is SightingKind.DOCUMENT and (
                    part.sha256 is None or part.content is None
                ):
                    raise ValueError(
                        f"uid {mail.uid} part {part.part!r}: a DOCUMENT needs sha256 and bytes"
                    )
        recorded: list[RecordedSighting] = []
        # One statement each for the whole batch, executed with each part's parameters:
        # building and compiling a statement per part cost more than running it.
        statements = self._statements()
        with self._write() as connection:
            self._fence_poll(connection, mailbox, owner)
            whole = [mail.uid for mail in mails if all(part.part for part in mail.parts)]
            earlier = (
                self._drop_mail_level_errors(connection, mailbox, uidvalidity, whole)
                if whole
                else {}
            )
            for mail in mails:
                for part in mail.parts:
                    recorded.append(
                        self._record_part(
                            connection,
                            statements,
                            mailbox=mailbox,
                            uidvalidity=uidvalidity,
                            mail=mail,
                            part=part,
                            dedup=dedup,
                            now=now,
                            earlier=earlier.get(mail.uid),
                            route=route,
                            destination=destination,
                        )
                    )
            if advance_to is not None:
                self._advance(connection, mailbox, uidvalidity, advance_to, now)
        return recorded

    def _statements(self) -> _Statements:
        upsert = self._insert(sightings)
        replaced: dict[str, Any] = {
            column.name: upsert.excluded[column.name]
            for column in sightings.c
            if column.name not in {"id", *_KEPT_ON_RETRY}
        }
        replaced["tries"] = sightings.c.tries + 1
        return _Statements(
            sighting=upsert.on_conflict_do_update(
                index_elements=[sightings.c[name] for name in _LOCATION],
                set_=replaced,
                where=sightings.c.kind == SightingKind.ERROR.value,
            ).returning(sightings.c.id),
            claim=claim_statement(self._insert(documents)),
            link=sa.update(sightings)
            .where(sightings.c.id == sa.bindparam("sighting_id"))
            .values(document_id=sa.bindparam("new_document_id")),
        )

    def _drop_mail_level_errors(
        self, connection: Connection, mailbox: str, uidvalidity: int, uids: Sequence[int]
    ) -> dict[int, _EarlierTries]:
        """A mail that failed as a whole has one ERROR row at part "". Once a retry reads
        its parts, that placeholder gives way to one row per part, which carry on its
        count of tries (else a mail could be tried INVOICE_RELAY_ERROR_RETRIES times as
        a whole and as many again part by part) and when it was first seen."""
        dropped = connection.execute(
            sa.delete(sightings)
            .where(
                sightings.c.mailbox == mailbox,
                sightings.c.uidvalidity == uidvalidity,
                sightings.c.uid.in_(list(uids)),
                sightings.c.part == "",
                sightings.c.kind == SightingKind.ERROR.value,
            )
            .returning(sightings.c.uid, sightings.c.tries, sightings.c.received_at)
        )
        return {
            int(row.uid): _EarlierTries(tries=int(row.tries), received_at=row.received_at)
            for row in dropped
        }

    def _record_part(
        self,
        connection: Connection,
        statements: _Statements,
        *,
        mailbox: str,
        uidvalidity: int,
        mail: MailRecord,
        part: PartRecord,
        dedup: DedupMode,
        now: datetime,
        route: str,
        destination: str,
        earlier: _EarlierTries | None = None,
    ) -> RecordedSighting:
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
            "invoice_number_ambiguous": part.invoice_number_ambiguous or None,
            "credit_note": part.credit_note or None,
            "kind": part.kind.value,
            "reason": part.reason,
            "reason_code": None if part.reason_code is None else part.reason_code.value,
            "document_id": None,
            "duplicate_of": None,
            "tries": 1,
            "route": route,
        }
        if earlier is not None:  # this read is another try of a mail that failed whole
            values["tries"] = earlier.tries + 1
            values["received_at"] = earlier.received_at
        sighting_id = connection.execute(statements.sighting, values).scalar_one_or_none()
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
            connection,
            statements,
            sighting_id=sighting_id,
            uid=mail.uid,
            part=part,
            dedup=dedup,
            now=now,
            mailbox=mailbox,
            destination=destination,
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
        statements: _Statements,
        *,
        sighting_id: int,
        uid: int,
        part: PartRecord,
        dedup: DedupMode,
        now: datetime,
        mailbox: str,
        destination: str,
    ) -> RecordedSighting:
        content_key = part.fingerprint if dedup is DedupMode.CONTENT else None
        document_id = connection.execute(
            statements.claim,
            {
                "new_destination": destination,
                "new_mailbox": mailbox,
                "new_sha256": part.sha256,
                "new_fingerprint": part.fingerprint,
                "new_content_key": content_key,
                "new_state": DocumentState.PENDING.value,
                "new_attempts": 0,
                "new_next_attempt_at": now,
                "new_filename": part.filename,
                "new_size_bytes": part.size_bytes,
                "new_resend_count": 0,
                "new_created_at": now,
            },
        ).scalar_one_or_none()
        if document_id is not None:
            if part.content is not None:
                self._store_content(connection, document_id, part.content)
            connection.execute(
                statements.link, {"sighting_id": sighting_id, "new_document_id": document_id}
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
        known = known_document(connection, part.sha256, content_key, destination)
        if known is None:
            raise StoreError(f"document {part.sha256} conflicted with no visible document")
        document_id, key = known
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


def _now() -> datetime:
    return datetime.now().astimezone()
