"""Failure notices: what was notified, so no row is notified twice.

Revision ID: 0002_notifications
Revises: 0001
Create Date: 2026-11-24

`notifications` holds one row per summary mail sent to INVOICE_RELAY_NOTIFY_TO, with the
highest `rejected`/`error` sighting id it covered; `notified_documents` the `failed`
documents it covered (a document is notified once).

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_notifications"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recipient", sa.Text, nullable=False),
        sa.Column("last_sighting_id", sa.Integer, nullable=False),
        sa.Column("failed_documents", sa.Integer, nullable=False),
        sa.Column("problem_sightings", sa.Integer, nullable=False),
    )
    op.create_table(
        "notified_documents",
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", name="fk_notified_documents_document_id_documents"),
            primary_key=True,
        ),
        sa.Column(
            "notification_id",
            sa.Integer,
            sa.ForeignKey(
                "notifications.id", name="fk_notified_documents_notification_id_notifications"
            ),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_table("notified_documents")
    op.drop_table("notifications")
