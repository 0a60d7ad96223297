"""What many routes share in the database: one replica per (route, fire time), each
route's last poll by any replica, the purge of a removed route's mailbox folder, and the
destinations whose pending documents no configured folder will send."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.models import (
    DEFAULT_ROUTE,
    DocumentState,
    PurgeCounts,
    RoutePollState,
    SightingKind,
)
from worker.store.engine import SqlBase
from worker.store.schema import (
    delivery_attempts,
    document_contents,
    documents,
    mail_actions,
    mailbox_state,
    notified_documents,
    poll_claims,
    poll_leases,
    route_polls,
    sightings,
)

# How `orphaned_destinations` names documents older than destinations (NULL).
OLDER_THAN_DESTINATIONS: Final = "(older than destinations)"
_CHUNK = 500  # ids per IN (...) list: SQLite bounds the number of bound parameters


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield list(ids[start : start + _CHUNK])


class RouteRows(SqlBase):
    """Fire-time claims, last polls, purges. Raises `StoreError` when the database fails."""

    # --- fire times ------------------------------------------------------------------

    def claim_fire(self, route: str, fire_time: datetime, owner: str) -> bool:
        """Claim one fire time of `route` for `owner`: True for the one replica whose
        INSERT wins, False for every other (the conflict is the answer, not an error)."""
        statement = (
            self._insert(poll_claims)
            .values(route=route, fire_time=fire_time, owner=owner, claimed_at=self._db_now())
            .on_conflict_do_nothing()
            .returning(poll_claims.c.route)
        )
        with self._write() as connection:
            return connection.execute(statement).first() is not None

    def forget_claims_older_than(self, seconds: float) -> int:
        """Delete the claims made more than `seconds` ago on the database's clock;
        returns how many. By when a claim was made, not by its fire time: a fire time
        long past (a yearly schedule's latest) must not be freed by one replica just as
        another claimed it, or both would poll it."""
        with self._write() as connection:
            return connection.execute(
                sa.delete(poll_claims).where(poll_claims.c.claimed_at < self._db_now(-seconds))
            ).rowcount

    # --- last polls ------------------------------------------------------------------

    def record_route_poll(
        self,
        route: str,
        *,
        started_at: datetime,
        finished_at: datetime,
        ok: bool,
        summary: str,
        error: str | None,
        owner: str,
    ) -> None:
        """A poll of `route` ended. The last poll is the one that started last, whichever
        replica finished when; `last_success_at` only moves on a success, and forward."""
        statement = self._insert(route_polls).values(
            route=route,
            last_started_at=started_at,
            last_finished_at=finished_at,
            last_success_at=finished_at if ok else None,
            last_result=summary,
            last_error=None if ok else (error or summary),
            owner=owner,
        )
        new, old = statement.excluded, route_polls.c
        newer = new.last_started_at >= old.last_started_at
        latest = {
            name: sa.case((newer, new[name]), else_=old[name])
            for name in (
                "last_started_at",
                "last_finished_at",
                "last_result",
                "last_error",
                "owner",
            )
        }
        latest["last_success_at"] = sa.case(
            (new.last_success_at.is_(None), old.last_success_at),
            (old.last_success_at.is_(None), new.last_success_at),
            (new.last_success_at > old.last_success_at, new.last_success_at),
            else_=old.last_success_at,
        )
        with self._write() as connection:
            connection.execute(
                statement.on_conflict_do_update(index_elements=[old.route], set_=latest)
            )

    def route_polls(self) -> dict[str, RoutePollState]:
        with self._read() as connection:
            rows = connection.execute(sa.select(route_polls).order_by(route_polls.c.route)).all()
        return {
            row.route: RoutePollState(
                route=row.route,
                last_started_at=row.last_started_at,
                last_finished_at=row.last_finished_at,
                last_success_at=row.last_success_at,
                last_result=row.last_result,
                last_error=row.last_error,
                owner=row.owner,
            )
            for row in rows
        }

    # --- removed routes --------------------------------------------------------------

    def route_mailboxes(self, route: str) -> list[str]:
        """The mailbox folders whose sightings `route` recorded (to purge a route that
        is no longer configured)."""
        with self._read() as connection:
            return list(
                connection.execute(
                    sa.select(sightings.c.mailbox)
                    .distinct()
                    .where(sa.func.coalesce(sightings.c.route, DEFAULT_ROUTE) == route)
                    .order_by(sightings.c.mailbox)
                ).scalars()
            )

    def orphaned_destinations(self, mailboxes: Collection[str]) -> list[tuple[str, int]]:
        """Destinations with pending documents that none of `mailboxes` introduced: no
        configured route will send them. Documents older than destinations are counted
        under `OLDER_THAN_DESTINATIONS`."""
        name = sa.func.coalesce(documents.c.destination, OLDER_THAN_DESTINATIONS)
        statement = (
            sa.select(name.label("destination"), sa.func.count().label("pending"))
            .where(
                documents.c.state == DocumentState.PENDING.value,
                sa.or_(documents.c.mailbox.is_(None), documents.c.mailbox.not_in(list(mailboxes))),
            )
            .group_by(name)
            .order_by(name)
        )
        with self._read() as connection:
            return [(row.destination, int(row.pending)) for row in connection.execute(statement)]

    def purge(self, mailbox: str, *, before: datetime | None = None) -> PurgeCounts:
        """Delete the sightings of one mailbox folder (received before `before`, when
        given) and the documents they introduced, with their PDFs, attempts and notice marks;
        without `before`, the folder's poll position and poll lease too. In one
        transaction.

        A document introduced here that sightings which stay (another folder's, or this
        folder's from `before` on) name as duplicates is kept: the oldest of them becomes
        its introducing sighting, the others its duplicates, and the document moves to
        that sighting's folder, whose route then delivers it if it still waits."""
        doomed = sightings.c.mailbox == mailbox
        if before is not None:
            doomed = sa.and_(doomed, sightings.c.received_at < before)
        with self._write() as connection:
            introduced = list(
                connection.execute(
                    sa.select(sightings.c.document_id)
                    .where(
                        doomed,
                        sightings.c.kind == SightingKind.DOCUMENT.value,
                        sightings.c.document_id.is_not(None),
                    )
                    .order_by(sightings.c.document_id)
                ).scalars()
            )
            kept = self._hand_over(connection, introduced, doomed)
            removed = [document_id for document_id in introduced if document_id not in kept]
            counts = {"sightings": connection.execute(sa.delete(sightings).where(doomed)).rowcount}
            deleted_documents = 0
            for chunk in _chunks(removed):
                for table in (notified_documents, document_contents, delivery_attempts):
                    connection.execute(sa.delete(table).where(table.c.document_id.in_(chunk)))
                deleted_documents += connection.execute(
                    sa.delete(documents).where(documents.c.id.in_(chunk))
                ).rowcount
            still_seen = (
                sa.select(sightings.c.id)
                .where(
                    sightings.c.mailbox == mail_actions.c.mailbox,
                    sightings.c.uidvalidity == mail_actions.c.uidvalidity,
                    sightings.c.uid == mail_actions.c.uid,
                )
                .exists()
            )
            counts["mail_actions"] = connection.execute(
                sa.delete(mail_actions).where(mail_actions.c.mailbox == mailbox, ~still_seen)
            ).rowcount
            counts["positions"] = 0
            if before is None:
                counts["positions"] = connection.execute(
                    sa.delete(mailbox_state).where(mailbox_state.c.mailbox == mailbox)
                ).rowcount
                connection.execute(sa.delete(poll_leases).where(poll_leases.c.mailbox == mailbox))
        return PurgeCounts(documents=deleted_documents, documents_kept=len(kept), **counts)

    def _hand_over(
        self, connection: Connection, introduced: Sequence[int], doomed: sa.ColumnElement[bool]
    ) -> set[int]:
        """The documents of `introduced` that sightings outside `doomed` still name: each
        gets its oldest such sighting as its introducer. Returns their ids."""
        kept: set[int] = set()
        for chunk in _chunks(introduced):
            heirs = connection.execute(
                sa.select(sightings.c.document_id, sa.func.min(sightings.c.id).label("heir"))
                .where(sightings.c.document_id.in_(chunk), ~doomed)
                .group_by(sightings.c.document_id)
            ).all()
            for document_id, heir in heirs:
                kept.add(document_id)
                heir_mailbox = connection.execute(
                    sa.update(sightings)
                    .where(sightings.c.id == heir)
                    .values(
                        kind=SightingKind.DOCUMENT.value,
                        duplicate_of=None,
                        reason="introduces its document since the mail that did was purged",
                    )
                    .returning(sightings.c.mailbox)
                ).scalar_one()
                connection.execute(
                    sa.update(sightings)
                    .where(sightings.c.document_id == document_id, sightings.c.id != heir, ~doomed)
                    .values(duplicate_of=heir)
                )
                connection.execute(
                    sa.update(documents)
                    .where(documents.c.id == document_id)
                    .values(mailbox=heir_mailbox)
                )
        return kept
