"""The status page's reads (`worker.relay.ports.PageReader`), every one within a
`RouteScope`.

One filter scopes everything: `_route` is the route of an `audit_log` row and
`_in_scope` the condition that a user may see it; rows, counts, a document's page, the
`duplicate_of` links and the CSV all go through them. A row recorded before routes
is route `default`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from worker.models import (
    DEFAULT_ROUTE,
    AuditPage,
    AuditRow,
    AuditSearch,
    DocumentState,
    DocumentStory,
    Outcome,
    QueuedDocument,
    RouteOverview,
    RouteScope,
    SightingKind,
)
from worker.store.attempts import attempt_history
from worker.store.engine import SqlBase
from worker.store.schema import (
    audit_log,
    document_contents,
    documents,
    mailbox_state,
    route_polls,
    sightings,
)

_MAX_QUEUED = 20  # documents listed per route and state on the overview


def _route(table: sa.Table | Any) -> sa.ColumnElement[str]:
    """The route of a row of `audit_log` (or `sightings`, whose NULL is `default`)."""
    if table is sightings:
        return sa.func.coalesce(sightings.c.route, DEFAULT_ROUTE)
    route: sa.ColumnElement[str] = table.c.route
    return route


def _in_scope(table: sa.Table | Any, scope: RouteScope) -> sa.ColumnElement[bool]:
    if scope.routes is None:
        return sa.true()
    return _route(table).in_(sorted(scope.routes))


def _folder_routes(connection: sa.Connection) -> dict[str, str]:
    """Each polled folder's route: the one that recorded its latest sighting, `default`
    for a folder with none yet."""
    latest = (
        sa.select(sightings.c.mailbox, sa.func.max(sightings.c.id).label("id"))
        .group_by(sightings.c.mailbox)
        .subquery()
    )
    named = {
        folder: route
        for folder, route in connection.execute(
            sa.select(sightings.c.mailbox, _route(sightings)).join(
                latest, latest.c.id == sightings.c.id
            )
        )
    }
    folders = connection.execute(sa.select(mailbox_state.c.mailbox)).scalars()
    return {folder: named.get(folder, DEFAULT_ROUTE) for folder in folders} | named


def _known_routes(connection: sa.Connection) -> list[str]:
    """The routes the data knows: those that recorded sightings or polled, and
    `default` when there are none."""
    recorded = sa.select(_route(sightings).label("route")).distinct()
    polled = sa.select(route_polls.c.route)
    names = set(connection.execute(sa.union(recorded, polled)).scalars())
    return sorted(names or {DEFAULT_ROUTE})


def _scoped_duplicate_of(scope: RouteScope) -> sa.ColumnElement[int | None]:
    """`duplicate_of`, or NULL when the row it names is outside the scope."""
    if scope.routes is None:
        return audit_log.c.duplicate_of
    target = audit_log.alias("target")
    visible = (
        sa.select(target.c.id)
        .where(target.c.id == audit_log.c.duplicate_of, _in_scope(target, scope))
        .exists()
    )
    return sa.case((visible, audit_log.c.duplicate_of), else_=sa.null())


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"


def _scoped_rows(scope: RouteScope) -> sa.Select[Any]:
    columns = [
        column if column.name != "duplicate_of" else _scoped_duplicate_of(scope).label(column.name)
        for column in audit_log.c
    ]
    return sa.select(*columns).where(_in_scope(audit_log, scope))


class PageQueries(SqlBase):
    """The status page's reads. Raises `StoreError` when the database fails."""

    def search_audit(self, search: AuditSearch) -> AuditPage:
        conditions: list[sa.ColumnElement[bool]] = [_in_scope(audit_log, search.scope)]
        if search.route is not None:
            conditions.append(_route(audit_log) == search.route)
        if search.invoice_number:
            conditions.append(audit_log.c.invoice_number == search.invoice_number)
        if search.sender:
            conditions.append(sa.func.lower(audit_log.c.sender).like(_like(search.sender), "\\"))
        if search.filename:
            conditions.append(
                sa.func.lower(audit_log.c.filename).like(_like(search.filename), "\\")
            )
        if search.outcomes:
            conditions.append(audit_log.c.outcome.in_([o.value for o in search.outcomes]))
        if search.received_from is not None:
            conditions.append(audit_log.c.received_at >= search.received_from)
        if search.received_before is not None:
            conditions.append(audit_log.c.received_at < search.received_before)
        statement = (
            _scoped_rows(search.scope)
            .where(*conditions)
            .order_by(audit_log.c.received_at.desc(), audit_log.c.id.desc())
            .offset(search.offset)
        )
        if search.limit is not None:
            statement = statement.limit(search.limit)
        counting = sa.select(sa.func.count()).select_from(audit_log).where(*conditions)
        with self._read() as connection:
            rows = connection.execute(statement).all()
            total = int(connection.execute(counting).scalar_one())
        return AuditPage(rows=tuple(audit_row(row) for row in rows), total=total)

    def document_story(self, sighting_id: int, scope: RouteScope) -> DocumentStory | None:
        with self._read() as connection:
            found = connection.execute(
                _scoped_rows(scope).where(audit_log.c.id == sighting_id)
            ).first()
            if found is None:
                return None
            row = audit_row(found)
            document_id = connection.execute(
                sa.select(sightings.c.document_id).where(sightings.c.id == sighting_id)
            ).scalar_one_or_none()
            if document_id is None:
                return DocumentStory(row=row, route=row.route, document_id=None, state=None)
            document = connection.execute(
                sa.select(documents, _kept().label("kept")).where(documents.c.id == document_id)
            ).one()
            # Every sighting of the document: the one that introduced it and the
            # duplicates (their document_id names it too), within the scope.
            related = connection.execute(
                _scoped_rows(scope)
                .join(sightings, sightings.c.id == audit_log.c.id)
                .where(sightings.c.document_id == document_id)
                .order_by(audit_log.c.received_at, audit_log.c.id)
            ).all()
            history = attempt_history(connection, document_id)
        return DocumentStory(
            row=row,
            route=row.route,
            document_id=document_id,
            state=DocumentState(document.state),
            attempts=document.attempts,
            last_answer=document.last_answer,
            next_attempt_at=document.next_attempt_at,
            forwarded_at=document.forwarded_at,
            forwarded_message_id=document.forwarded_message_id,
            delivered_via=document.delivered_via,
            delivery_id=document.delivery_id,
            resend_count=document.resend_count,
            created_at=document.created_at,
            pdf_kept=bool(document.kept),
            sightings=tuple(audit_row(item) for item in related),
            attempt_history=history,
        )

    def route_overviews(self, scope: RouteScope, now: datetime) -> list[RouteOverview]:
        today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        month = today.replace(day=1)
        overviews = []
        with self._read() as connection:
            all_positions = connection.execute(
                sa.select(mailbox_state.c.mailbox, mailbox_state.c.updated_at).order_by(
                    mailbox_state.c.mailbox
                )
            ).all()
            folder_routes = _folder_routes(connection)
            for route in _known_routes(connection):
                if not scope.allows(route):
                    continue
                only = RouteScope.of([route])
                positions = [
                    position
                    for position in all_positions
                    if folder_routes.get(position.mailbox, DEFAULT_ROUTE) == route
                ]
                overviews.append(
                    RouteOverview(
                        route=route,
                        mailboxes=tuple(position.mailbox for position in positions),
                        position_moved_at=max(
                            (position.updated_at for position in positions), default=None
                        ),
                        waiting=self._queued(connection, only, DocumentState.PENDING),
                        failed=self._queued(connection, only, DocumentState.FAILED),
                        today=self._outcome_counts(connection, only, today),
                        month=self._outcome_counts(connection, only, month),
                    )
                )
        return overviews

    def document_pdf(self, sighting_id: int, scope: RouteScope) -> tuple[str, bytes] | None:
        with self._read() as connection:
            found = connection.execute(
                sa.select(
                    documents.c.id, documents.c.filename, self._selected_content().label("content")
                )
                .select_from(
                    sightings.join(documents, documents.c.id == sightings.c.document_id).join(
                        document_contents, document_contents.c.document_id == documents.c.id
                    )
                )
                .where(sightings.c.id == sighting_id, _in_scope(sightings, scope))
            ).first()
            if found is None:
                return None
            content = (
                found.content
                if found.content is not None
                else self._read_content(connection, found.id)
            )
        return found.filename or "invoice.pdf", bytes(content)

    def _queued(
        self, connection: sa.Connection, scope: RouteScope, state: DocumentState
    ) -> tuple[QueuedDocument, ...]:
        introducing = sa.and_(
            sightings.c.document_id == documents.c.id,
            sightings.c.kind == SightingKind.DOCUMENT.value,
        )
        rows = connection.execute(
            sa.select(
                sightings.c.id.label("sighting_id"),
                documents.c.filename,
                sightings.c.invoice_number,
                documents.c.attempts,
                documents.c.next_attempt_at,
                documents.c.last_answer,
            )
            .select_from(documents.join(sightings, introducing))
            .where(documents.c.state == state.value, _in_scope(sightings, scope))
            .order_by(documents.c.next_attempt_at, documents.c.id)
            .limit(_MAX_QUEUED)
        ).all()
        return tuple(
            QueuedDocument(
                sighting_id=row.sighting_id,
                filename=row.filename,
                invoice_number=row.invoice_number,
                attempts=row.attempts,
                next_attempt_at=row.next_attempt_at,
                last_answer=row.last_answer,
            )
            for row in rows
        )

    def _outcome_counts(
        self, connection: sa.Connection, scope: RouteScope, since: datetime
    ) -> dict[Outcome, int]:
        counts = dict.fromkeys(Outcome, 0)
        for outcome, count in connection.execute(
            sa.select(audit_log.c.outcome, sa.func.count())
            .where(audit_log.c.received_at >= since, _in_scope(audit_log, scope))
            .group_by(audit_log.c.outcome)
        ):
            counts[Outcome(outcome)] = int(count)
        return counts


def _kept() -> sa.ColumnElement[bool]:
    return (
        sa.select(document_contents.c.document_id)
        .where(document_contents.c.document_id == documents.c.id)
        .exists()
    )


def audit_row(row: Row[Any]) -> AuditRow:
    """One `audit_log` row as the value the CLI, the page and their CSV share."""
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
        mail_action=row.mail_action,
        delivered_via=row.delivered_via,
        delivery_id=row.delivery_id,
        route=row.route,
        destination=row.destination,
    )
