"""Leases with live owners: a document's lease owner and the per-mailbox poll lease.

Revision ID: 0005_leases
Revises: 0004_reason_codes
Create Date: 2026-12-01

A claim used to be a long `lease_until` alone (up to an hour, so that a slow send was
never repeated), and the poll lock a PostgreSQL session advisory lock, which a node lost
without a FIN keeps for hours. Now both are short leases renewed by a live owner: the
owner's token goes with every write under the lease (fencing), and the poll lease is a
row whose expiry is on the database's clock.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_leases"
down_revision: str | None = "0004_reason_codes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("documents", sa.Column("lease_owner", sa.Text, nullable=True))
    op.create_index("ix_documents_lease_owner", "documents", ["lease_owner"])
    # A lease taken before the upgrade has no owner to renew it: let it expire now
    # rather than up to an hour from now.
    op.execute("UPDATE documents SET lease_until = NULL")
    op.create_table(
        "poll_leases",
        sa.Column("mailbox", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("poll_leases")
    op.drop_index("ix_documents_lease_owner", table_name="documents")
    # SQLite (3.35 and later) drops a column in place: no key or view uses it.
    op.drop_column("documents", "lease_owner")
