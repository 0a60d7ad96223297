"""Each try at delivering a document (`delivery_attempts`), for a document's story.

Revision ID: 0014_delivery_attempts
Revises: 0008_gmi_delivery
Create Date: 2026-12-02

Until this revision only a document's count of attempts and its last answer were kept.
A document forwarded before it gets its delivery as its one known attempt (at
`forwarded_at`, with its last answer); earlier tries, and those of documents still
pending or failed, were never recorded and stay unknown. The view is unchanged.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_delivery_attempts"
down_revision: str | None = "0008_gmi_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", name="fk_delivery_attempts_document_id_documents"),
            nullable=False,
        ),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("via", sa.Text, nullable=False),
        sa.CheckConstraint(
            "outcome IN ('forwarded', 'retry', 'failed', 'held', 'released')",
            name="ck_delivery_attempts_outcome",
        ),
    )
    op.create_index(
        "ix_delivery_attempts_document_id", "delivery_attempts", ["document_id", "id"]
    )
    op.execute(
        "INSERT INTO delivery_attempts (document_id, attempted_at, outcome, answer, via)"
        " SELECT id, forwarded_at, 'forwarded', COALESCE(last_answer, ''),"
        " COALESCE(delivered_via, 'smtp')"
        " FROM documents WHERE state = 'forwarded' AND forwarded_at IS NOT NULL"
        " ORDER BY id"
    )


def downgrade() -> None:
    op.drop_index("ix_delivery_attempts_document_id", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
