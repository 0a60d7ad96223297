"""Failure notices that survive concurrency: what was notified is kept per sighting, per
mailbox, and one process at a time sends a mailbox's notice.

Revision ID: 0013_notified_sightings
Revises: 0008_gmi_delivery
Create Date: 2026-12-02

Until now a notice covered "every rejected/error sighting up to `last_sighting_id`". With
several writers of sightings (mailboxes, replicas) ids commit out of order, and a row
committed below that mark after the notice went out was never reported. Now
`notified_sightings` names each sighting a notice covered, as `notified_documents` does
for failed documents; the rows are removed with their sighting (a mail's error
placeholder gives way to its parts, and SQLite may hand its id out again).

What the old mark covered stays covered: every rejected/error sighting at or below the
highest `last_sighting_id` gets a row, naming the first notice whose mark reached it.
`notifications.mailbox` scopes a notice (NULL: one written before notices were per
mailbox). `notice_leases` holds, per mailbox, the process sending its notice (an owner
token and an expiry on the database's clock, like `poll_leases`).

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_notified_sightings"
# MERGE: the head when this was written; the integrator re-chains it.
down_revision: str | None = "0011_destinations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BACKFILL = """
INSERT INTO notified_sightings (sighting_id, notification_id)
SELECT s.id,
       (SELECT min(n.id) FROM notifications AS n WHERE n.last_sighting_id >= s.id)
FROM sightings AS s
WHERE s.kind IN ('rejected', 'error')
  AND s.id <= (SELECT max(n.last_sighting_id) FROM notifications AS n)
"""


def upgrade() -> None:
    op.create_table(
        "notified_sightings",
        sa.Column(
            "sighting_id",
            sa.Integer,
            sa.ForeignKey(
                "sightings.id",
                name="fk_notified_sightings_sighting_id_sightings",
                ondelete="CASCADE",
            ),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column(
            "notification_id",
            sa.Integer,
            sa.ForeignKey(
                "notifications.id", name="fk_notified_sightings_notification_id_notifications"
            ),
            nullable=False,
        ),
    )
    op.add_column("notifications", sa.Column("mailbox", sa.Text, nullable=True))
    op.create_table(
        "notice_leases",
        sa.Column("mailbox", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(_BACKFILL)


def downgrade() -> None:
    # The old mark stays as it was written (notices after this revision kept it going
    # up), so the code before this revision reads it as before.
    op.drop_table("notice_leases")
    op.drop_column("notifications", "mailbox")
    op.drop_table("notified_sightings")
