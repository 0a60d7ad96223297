"""The failure notices' queries (`worker.relay.notify.NoticeLog` on SQL): which problem rows
nobody was told of yet, and what a sent notice covered."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from worker.models import (
    DocumentState,
    NoticeMark,
    Problem,
    ProblemKind,
    ReasonCode,
    SightingKind,
)
from worker.store.engine import SqlBase
from worker.store.schema import documents, notifications, notified_documents, sightings

_SIGHTING_PROBLEMS = {
    SightingKind.REJECTED.value: ProblemKind.REJECTED,
    SightingKind.ERROR.value: ProblemKind.ERROR,
}


class SqlNoticeLog(SqlBase):
    """Raises `StoreError` when the database fails. Runs inside the poll lock, so no
    sighting is written while it reads."""

    def last_notice(self) -> NoticeMark | None:
        statement = (
            sa.select(notifications.c.sent_at, notifications.c.last_sighting_id)
            .order_by(notifications.c.id.desc())
            .limit(1)
        )
        with self._read() as connection:
            row = connection.execute(statement).first()
        if row is None:
            return None
        return NoticeMark(sent_at=row.sent_at, last_sighting_id=int(row.last_sighting_id))

    def unnotified(self, *, after_sighting_id: int, limit: int) -> list[Problem]:
        """Rejected and error sightings above the high-water mark, and failed documents
        not yet notified, in audit id order."""
        already = sa.select(notified_documents.c.document_id).where(
            notified_documents.c.document_id == documents.c.id
        )
        new_sighting = sa.and_(
            sightings.c.kind.in_(list(_SIGHTING_PROBLEMS)),
            sightings.c.id > after_sighting_id,
            # Our own notice come back: reporting it would cause the next notice. A mail
            # gone before it was fetched: a person removed it, nobody needs telling.
            sa.func.coalesce(sightings.c.reason_code, "").not_in(
                [ReasonCode.NOTICE_LOOP.value, ReasonCode.VANISHED.value]
            ),
        )
        failed_document = sa.and_(
            sightings.c.kind == SightingKind.DOCUMENT.value,
            documents.c.state == DocumentState.FAILED.value,
            ~sa.exists(already),
        )
        statement = (
            sa.select(
                sightings.c.id,
                sightings.c.kind,
                sightings.c.filename,
                sightings.c.reason,
                documents.c.id.label("document_id"),
                documents.c.last_answer,
            )
            .select_from(sightings.outerjoin(documents, documents.c.id == sightings.c.document_id))
            .where(sa.or_(new_sighting, failed_document))
            .order_by(sightings.c.id)
            .limit(limit)
        )
        with self._read() as connection:
            rows = connection.execute(statement).all()
        problems: list[Problem] = []
        for row in rows:
            if row.kind == SightingKind.DOCUMENT.value:
                problems.append(
                    Problem(
                        audit_id=int(row.id),
                        kind=ProblemKind.FAILED,
                        reason=row.last_answer or row.reason or "",
                        filename=row.filename,
                        document_id=int(row.document_id),
                    )
                )
            else:
                problems.append(
                    Problem(
                        audit_id=int(row.id),
                        kind=_SIGHTING_PROBLEMS[row.kind],
                        reason=row.reason or "",
                        filename=row.filename,
                    )
                )
        return problems

    def record(
        self,
        *,
        sent_at: datetime,
        recipient: str,
        last_sighting_id: int,
        problems: Sequence[Problem],
    ) -> None:
        failed = [p.document_id for p in problems if p.document_id is not None]
        with self._write() as connection:
            result = connection.execute(
                sa.insert(notifications).values(
                    sent_at=sent_at,
                    recipient=recipient,
                    last_sighting_id=last_sighting_id,
                    failed_documents=len(failed),
                    problem_sightings=len(problems) - len(failed),
                )
            )
            (notification_id,) = result.inserted_primary_key or (None,)
            if failed:
                # A document already notified (a repeated notice after a crash) keeps its row.
                connection.execute(
                    self._insert(notified_documents)
                    .values(
                        [
                            {"document_id": document_id, "notification_id": notification_id}
                            for document_id in failed
                        ]
                    )
                    .on_conflict_do_nothing(index_elements=["document_id"])
                )
