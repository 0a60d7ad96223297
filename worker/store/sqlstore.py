"""`SqlStore`: every store Protocol of `worker.relay.ports` (`PollStore`, `SendQueue`,
`AuditReader`, `AdminStore`) on SQLAlchemy Core, for SQLite and PostgreSQL.

The database decides uniqueness: sightings and documents are claimed by INSERT ... ON
CONFLICT, and only after a conflict does the store read which row won. The queries
live by topic: `worker.store.sightings` (what a poll read), `worker.store.queue`
(forwarding), `worker.store.admin` (retry, resend, counts), `worker.store.routes` (fire
times, last polls, purges); this module adds the ERROR rows a poll retries and the audit
log; the leases (who may send, who may poll) are `worker.store.leases`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.errors import StoreError
from worker.models import AuditFilter, AuditRow, SightingKind
from worker.store.admin import AdminQueries
from worker.store.budgets import BudgetRows
from worker.store.dedup import known_document
from worker.store.engine import make_engine
from worker.store.mailactions import MailActionRows
from worker.store.pages import PageQueries, audit_row
from worker.store.queue import DocumentQueue
from worker.store.routes import RouteRows
from worker.store.schema import audit_log, sightings
from worker.store.sightings import MailRecorder
from worker.store.websessions import WebSessionRows

log = logging.getLogger(__name__)


class SqlStore(
    MailRecorder,
    DocumentQueue,
    AdminQueries,
    RouteRows,
    MailActionRows,
    PageQueries,
    WebSessionRows,
    BudgetRows,
):
    """The relay's SQL store. Every method raises `StoreError` when the database fails."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        super().__init__(make_engine(url, echo=echo))

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # --- error rows: retried on later polls, rejected once tried enough or unreadable ----

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

    def abandon_errors(
        self, *, mailbox: str, uidvalidity: int, uids: Sequence[int] | None, reason: str
    ) -> int:
        conditions = [
            sightings.c.mailbox == mailbox,
            sightings.c.uidvalidity == uidvalidity,
            sightings.c.kind == SightingKind.ERROR.value,
        ]
        if uids is not None:
            conditions.append(sightings.c.uid.in_(list(uids)))
        with self._write() as connection:
            result = connection.execute(
                sa.update(sightings)
                .where(*conditions)
                .values(
                    kind=SightingKind.REJECTED.value,
                    reason=sa.literal(reason + "; before: ")
                    + sa.func.coalesce(sightings.c.reason, ""),
                )
            )
            return result.rowcount

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

    # --- reading -------------------------------------------------------------------------

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
        if query.route is not None:
            statement = statement.where(audit_log.c.route == query.route)
        if query.limit is not None:
            statement = statement.limit(query.limit)
        with self._read() as connection:
            rows = connection.execute(statement).all()
        return [audit_row(row) for row in rows]

    def known_key(self, *, sha256: str, content_key: str | None, destination: str) -> str | None:
        """For a dry run only (it decides nothing): which key of a PDF is already known
        to `destination` (or to all: older than destinations), "sha256" or "content
        fingerprint", or None."""
        with self._read() as connection:
            known = known_document(connection, sha256, content_key, destination)
        return None if known is None else known[1]

    def database_now(self) -> datetime:
        """The database's clock, on which every lease expires."""
        with self._read() as connection:
            return connection.execute(sa.select(self._db_now())).scalar_one()

    # --- locking -------------------------------------------------------------------------

    @contextmanager
    def poll_lock(self, mailbox: str, *, owner: str, lease_seconds: float) -> Iterator[bool]:
        """Hold this mailbox's poll lease while the block runs; yields False when another
        owner's lease runs. A lease, not a session lock: a replica lost without a word
        keeps its PostgreSQL session for hours, its lease only until it expires. The
        owner's heartbeat renews it meanwhile (`LeaseQueries.renew`)."""
        acquired = self.take_poll_lease(mailbox, owner=owner, lease_seconds=lease_seconds)
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    self.end_poll_lease(mailbox, owner=owner)
                except StoreError as exc:
                    # Left to expire: the next poll a lease later takes it over.
                    log.warning(
                        "handing back the poll lease failed: %s",
                        exc,
                        extra={"action": "poll_lock_lost", "mailbox": mailbox},
                    )
