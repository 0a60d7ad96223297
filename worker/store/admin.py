"""What the admin commands change and count: `retry` (FAILED back to PENDING), a
deliberate `resend`, the kept PDF `resend` checks, and the counts by state. Each takes
the route (the introducing sighting's) or the destination to narrow a SHA-256 that
documents of several destinations share; without either such a SHA-256 is refused
(`DestinationAmbiguous`), not applied to every destination at once."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.errors import DestinationAmbiguous
from worker.models import DEFAULT_ROUTE, DocumentState, SightingKind
from worker.store.dedup import destination_matches
from worker.store.engine import SqlBase
from worker.store.queue import has_content
from worker.store.schema import document_contents, documents, sightings


def introduced_on_route(route: str) -> sa.ColumnElement[bool]:
    """The document's introducing sighting was recorded by `route` (before routes: by
    `default`)."""
    return (
        sa.select(sightings.c.id)
        .where(
            sightings.c.document_id == documents.c.id,
            sightings.c.kind == SightingKind.DOCUMENT.value,
            sa.func.coalesce(sightings.c.route, DEFAULT_ROUTE) == route,
        )
        .exists()
    )


def _narrowed(
    connection: Connection, sha256: str | None, route: str | None, destination: str | None
) -> list[sa.ColumnElement[bool]]:
    """The conditions that pick the documents meant; raises `DestinationAmbiguous` for a
    SHA-256 of several destinations that neither filter narrows."""
    conditions: list[sa.ColumnElement[bool]] = []
    if sha256 is not None:
        conditions.append(documents.c.sha256 == sha256)
        if route is None and destination is None:
            names = tuple(
                connection.execute(
                    sa.select(documents.c.destination)
                    .distinct()
                    .where(documents.c.sha256 == sha256, documents.c.destination.is_not(None))
                    .order_by(documents.c.destination)
                ).scalars()
            )
            if len(names) > 1:
                raise DestinationAmbiguous(sha256, names)
    if destination is not None:
        conditions.append(destination_matches(destination))
    if route is not None:
        conditions.append(introduced_on_route(route))
    return conditions


class AdminQueries(SqlBase):
    """The queries of `worker.relay.ports.AdminStore` and the counts of `AuditReader`."""

    def document_mailboxes(
        self, sha256: str, *, route: str | None = None, destination: str | None = None
    ) -> list[str]:
        """The mailbox folders whose mail introduced the documents meant (whose route
        delivers them); raises `DestinationAmbiguous` as `requeue` does."""
        with self._read() as connection:
            conditions = _narrowed(connection, sha256, route, destination)
            return list(
                connection.execute(
                    sa.select(documents.c.mailbox)
                    .distinct()
                    .where(*conditions, documents.c.mailbox.is_not(None))
                    .order_by(documents.c.mailbox)
                ).scalars()
            )

    def requeue(
        self,
        *,
        sha256: str | None,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> int:
        """FAILED documents (one SHA-256's, or all; of one route or destination when
        given) back to PENDING with a fresh count of attempts. Returns how many."""
        with self._write() as connection:
            conditions = _narrowed(connection, sha256, route, destination)
            return connection.execute(
                sa.update(documents)
                .where(documents.c.state == DocumentState.FAILED.value, *conditions)
                .values(
                    state=DocumentState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    lease_until=None,
                    lease_owner=None,
                )
            ).rowcount

    def resend(
        self,
        *,
        sha256: str,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> bool:
        """A forwarded document queued again on purpose (its bytes must be kept); a new
        resend count, so a new Message-ID."""
        with self._write() as connection:
            conditions = _narrowed(connection, sha256, route, destination)
            return (
                connection.execute(
                    sa.update(documents)
                    .where(
                        documents.c.state == DocumentState.FORWARDED.value,
                        has_content(),
                        *conditions,
                    )
                    .values(
                        state=DocumentState.PENDING.value,
                        resend_count=documents.c.resend_count + 1,
                        next_attempt_at=now,
                        lease_until=None,
                        lease_owner=None,
                    )
                ).rowcount
                >= 1
            )

    def kept_content(
        self, sha256: str, *, route: str | None = None, destination: str | None = None
    ) -> bytes | None:
        """A document's stored PDF, or None (unknown, or dropped after forwarding)."""
        with self._read() as connection:
            conditions = _narrowed(connection, sha256, route, destination)
            content = connection.execute(
                sa.select(document_contents.c.content)
                .join(documents, documents.c.id == document_contents.c.document_id)
                .where(*conditions)
                .order_by(documents.c.id)
                .limit(1)
            ).scalar()
            return None if content is None else bytes(content)

    def state_counts(self, mailbox: str | None = None) -> dict[DocumentState, int]:
        """Documents by state: all of them, or those `mailbox` introduced (the ones its
        route delivers)."""
        statement = sa.select(documents.c.state, sa.func.count()).group_by(documents.c.state)
        if mailbox is not None:
            statement = statement.where(documents.c.mailbox == mailbox)
        counts = dict.fromkeys(DocumentState, 0)
        with self._read() as connection:
            for state, count in connection.execute(statement):
                counts[DocumentState(state)] = int(count)
        return counts
