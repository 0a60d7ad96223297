"""Leases with live owners: who may send a document, who may poll a mailbox.

A lease is a row with an owner token and an expiry on the database's clock, short, and
renewed while its owner works (`renew`, driven by `worker.relay.lease.Heartbeat`). An owner
that died or froze stops renewing, and its leases expire for the next process to take
over. Every write under a lease names its owner and changes nothing when the lease is
no longer that owner's (`LeaseLost`): a stale owner that wakes up cannot undo the work
of the one that took over.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.errors import LeaseLost
from worker.store.engine import SqlBase
from worker.store.schema import documents, notice_leases, poll_leases


class LeaseQueries(SqlBase):
    """The lease queries of `worker.relay.ports.Store`."""

    def take_poll_lease(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        """This mailbox's poll lease for `owner`: False while another owner's lease runs.
        An expired lease is taken over; the owner's own is renewed."""
        statement = self._insert(poll_leases).values(
            mailbox=mailbox, owner=owner, expires_at=self._db_now(lease_seconds)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[poll_leases.c.mailbox],
            set_={"owner": statement.excluded.owner, "expires_at": statement.excluded.expires_at},
            where=sa.or_(poll_leases.c.owner == owner, poll_leases.c.expires_at <= self._db_now()),
        )
        # RETURNING, not the row count: drivers need not count the rows of an INSERT.
        with self._write() as connection:
            taken = connection.execute(statement.returning(poll_leases.c.owner)).first()
        return taken is not None

    def end_poll_lease(self, mailbox: str, *, owner: str) -> None:
        """Hand the poll lease back at once (nothing when it is another owner's by now)."""
        with self._write() as connection:
            connection.execute(
                sa.delete(poll_leases).where(
                    poll_leases.c.mailbox == mailbox, poll_leases.c.owner == owner
                )
            )

    def renew(self, owner: str, *, lease_seconds: float) -> int:
        """Extend every unexpired lease `owner` holds (documents, poll and notice leases)
        to `lease_seconds` from now; an expired one stays lost. Returns how many."""
        with self._write() as connection:
            renewed = connection.execute(
                sa.update(documents)
                .where(documents.c.lease_owner == owner, documents.c.lease_until > self._db_now())
                .values(lease_until=self._db_now(lease_seconds))
            ).rowcount
            for table in (poll_leases, notice_leases):
                renewed += connection.execute(
                    sa.update(table)
                    .where(table.c.owner == owner, table.c.expires_at > self._db_now())
                    .values(expires_at=self._db_now(lease_seconds))
                ).rowcount
        return renewed

    def still_holds(self, document_id: int, *, owner: str, lease_seconds: float) -> bool:
        """Whether `owner` still holds this document's lease; renewed when it does, so
        that the check stays true for the moment the caller acts on it."""
        with self._write() as connection:
            return (
                connection.execute(
                    sa.update(documents)
                    .where(lease_held(document_id, owner, self._db_now()))
                    .values(lease_until=self._db_now(lease_seconds))
                ).rowcount
                == 1
            )

    def release_all(self, owner: str) -> int:
        """On the way out: every lease `owner` holds, free for the next process at once.
        Returns how many documents were released."""
        with self._write() as connection:
            released = connection.execute(
                sa.update(documents)
                .where(documents.c.lease_owner == owner)
                .values(lease_until=None, lease_owner=None)
            ).rowcount
            connection.execute(sa.delete(poll_leases).where(poll_leases.c.owner == owner))
            connection.execute(sa.delete(notice_leases).where(notice_leases.c.owner == owner))
        return released

    def _fence_poll(self, connection: Connection, mailbox: str, owner: str) -> None:
        """In a writing transaction: raise `LeaseLost` unless `owner` holds the poll lease
        of `mailbox`. An UPDATE, not a SELECT: the row stays locked until the caller's
        commit, so a takeover (`take_poll_lease`) waits for it and then sees the lease
        still running; it cannot slip in between the check and the write."""
        held = connection.execute(
            sa.update(poll_leases)
            .where(
                poll_leases.c.mailbox == mailbox,
                poll_leases.c.owner == owner,
                poll_leases.c.expires_at > self._db_now(),
            )
            .values(owner=poll_leases.c.owner)
        ).rowcount
        if held != 1:
            raise LeaseLost(f"the poll lease of {mailbox}")


def lease_held(
    document_id: int, owner: str, now: sa.ColumnElement[datetime]
) -> sa.ColumnElement[bool]:
    """This document's lease is `owner`'s and has not expired."""
    return sa.and_(
        documents.c.id == document_id,
        documents.c.lease_owner == owner,
        documents.c.lease_until > now,
    )
