"""The failure notices' queries (`worker.relay.notify.NoticeLog` on SQL): who sends a
mailbox's notice now, which of its problem rows nobody was told of yet, and what a sent
notice covered.

What was notified is kept per row (`notified_sightings`, `notified_documents`), never as
a high-water mark of ids: with several writers of sightings, ids commit out of order, and
a row committed below a mark after the notice went out would never be reported.
"""

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
from worker.store.schema import (
    documents,
    notice_leases,
    notifications,
    notified_documents,
    notified_sightings,
    sightings,
)

_SIGHTING_PROBLEMS = {
    SightingKind.REJECTED.value: ProblemKind.REJECTED,
    SightingKind.ERROR.value: ProblemKind.ERROR,
}


class SqlNoticeLog(SqlBase):
    """Raises `StoreError` when the database fails. The database decides who notifies:
    a mailbox's notice lease (`take`) is one owner's at a time, across replicas."""

    def take(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        """The right to send `mailbox`'s notice, for `owner`: False while another owner's
        lease runs. An expired lease (its owner died) is taken over."""
        statement = self._insert(notice_leases).values(
            mailbox=mailbox, owner=owner, expires_at=self._db_now(lease_seconds)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[notice_leases.c.mailbox],
            set_={"owner": statement.excluded.owner, "expires_at": statement.excluded.expires_at},
            where=sa.or_(
                notice_leases.c.owner == owner, notice_leases.c.expires_at <= self._db_now()
            ),
        )
        with self._write() as connection:
            taken = connection.execute(statement.returning(notice_leases.c.owner)).first()
        return taken is not None

    def still_holds(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        """Whether `owner` still holds `mailbox`'s notice lease; renewed when it does."""
        with self._write() as connection:
            return (
                connection.execute(
                    sa.update(notice_leases)
                    .where(*self._held(mailbox, owner))
                    .values(expires_at=self._db_now(lease_seconds))
                ).rowcount
                == 1
            )

    def release(self, mailbox: str, *, owner: str) -> None:
        """Hand the notice lease back (nothing when it is another owner's by now)."""
        with self._write() as connection:
            connection.execute(
                sa.delete(notice_leases).where(
                    notice_leases.c.mailbox == mailbox, notice_leases.c.owner == owner
                )
            )

    def _held(self, mailbox: str, owner: str) -> tuple[sa.ColumnElement[bool], ...]:
        return (
            notice_leases.c.mailbox == mailbox,
            notice_leases.c.owner == owner,
            notice_leases.c.expires_at > self._db_now(),
        )

    def last_notice(self, mailbox: str) -> NoticeMark | None:
        """The latest notice about `mailbox` (or from before notices were per mailbox)."""
        statement = (
            sa.select(notifications.c.sent_at, notifications.c.last_sighting_id)
            .where(sa.or_(notifications.c.mailbox == mailbox, notifications.c.mailbox.is_(None)))
            .order_by(notifications.c.id.desc())
            .limit(1)
        )
        with self._read() as connection:
            row = connection.execute(statement).first()
        if row is None:
            return None
        return NoticeMark(sent_at=row.sent_at, last_sighting_id=int(row.last_sighting_id))

    def unnotified(self, mailbox: str, *, limit: int) -> list[Problem]:
        """`mailbox`'s rejected and error sightings and failed documents that no notice
        covered yet, in audit id order."""
        document_notified = sa.select(notified_documents.c.document_id).where(
            notified_documents.c.document_id == documents.c.id
        )
        sighting_notified = sa.select(notified_sightings.c.sighting_id).where(
            notified_sightings.c.sighting_id == sightings.c.id
        )
        new_sighting = sa.and_(
            sightings.c.kind.in_(list(_SIGHTING_PROBLEMS)),
            ~sa.exists(sighting_notified),
            # Our own notice come back: reporting it would cause the next notice. A mail
            # gone before it was fetched: a person removed it, nobody needs telling.
            sa.func.coalesce(sightings.c.reason_code, "").not_in(
                [ReasonCode.NOTICE_LOOP.value, ReasonCode.VANISHED.value]
            ),
        )
        failed_document = sa.and_(
            sightings.c.kind == SightingKind.DOCUMENT.value,
            documents.c.state == DocumentState.FAILED.value,
            ~sa.exists(document_notified),
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
            .where(sightings.c.mailbox == mailbox, sa.or_(new_sighting, failed_document))
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
        mailbox: str,
        owner: str,
        sent_at: datetime,
        recipient: str,
        last_sighting_id: int,
        problems: Sequence[Problem],
    ) -> None:
        """What a sent notice covered, and its lease handed back, in one transaction.
        Recorded whoever holds the lease by now: the notice went out, and a row already
        recorded (by a notice repeated after a crash) keeps its first notice."""
        failed = [p.document_id for p in problems if p.document_id is not None]
        seen = [p.audit_id for p in problems if p.document_id is None]
        with self._write() as connection:
            highest = connection.execute(
                sa.select(sa.func.max(notifications.c.last_sighting_id))
            ).scalar_one_or_none()
            result = connection.execute(
                sa.insert(notifications).values(
                    sent_at=sent_at,
                    recipient=recipient,
                    last_sighting_id=max(last_sighting_id, int(highest or 0)),
                    failed_documents=len(failed),
                    problem_sightings=len(seen),
                    mailbox=mailbox,
                )
            )
            (notification_id,) = result.inserted_primary_key or (None,)
            if seen:
                # From the sightings that still exist: an error placeholder that gave way
                # to its parts meanwhile has nothing left to mark.
                existing = sa.select(sightings.c.id, sa.literal(notification_id, sa.Integer)).where(
                    sightings.c.id.in_(seen)
                )
                connection.execute(
                    self._insert(notified_sightings)
                    .from_select(["sighting_id", "notification_id"], existing)
                    .on_conflict_do_nothing(index_elements=["sighting_id"])
                )
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
            connection.execute(
                sa.delete(notice_leases).where(
                    notice_leases.c.mailbox == mailbox, notice_leases.c.owner == owner
                )
            )
