"""Initial schema: mailbox positions, documents, sightings and the audit_log view.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Migrations are frozen history: never import the current tables or view from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIT_VIEW_SQL = """
CREATE VIEW audit_log AS
SELECT
    s.id AS id,
    s.received_at AS received_at,
    s.mail_date AS mail_date,
    s.mailbox AS mailbox,
    s.uidvalidity AS uidvalidity,
    s.uid AS uid,
    s.message_id AS message_id,
    s.sender AS sender,
    s.subject AS subject,
    s.filename AS filename,
    s.size_bytes AS size_bytes,
    s.sha256 AS sha256,
    s.fingerprint AS fingerprint,
    s.invoice_number AS invoice_number,
    CASE WHEN s.kind = 'document' THEN d.state ELSE s.kind END AS outcome,
    CASE
        WHEN s.kind = 'document' AND d.state = 'failed' THEN COALESCE(d.last_answer, s.reason)
        ELSE s.reason
    END AS reason,
    s.duplicate_of AS duplicate_of,
    CASE WHEN s.kind = 'document' THEN d.forwarded_at END AS forwarded_at,
    CASE WHEN s.kind = 'document' THEN d.forwarded_message_id END AS forwarded_message_id,
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
"""


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mailbox_state",
        sa.Column("mailbox", sa.Text, primary_key=True),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("last_uid", sa.BigInteger, nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
    )
    op.create_table(
        "documents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=True),
        sa.Column("content_key", sa.Text, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", _timestamp(), nullable=False),
        sa.Column("lease_until", _timestamp(), nullable=True),
        sa.Column("forwarded_message_id", sa.Text, nullable=True),
        sa.Column("forwarded_at", _timestamp(), nullable=True),
        sa.Column("last_answer", sa.Text, nullable=True),
        sa.Column("content", sa.LargeBinary, nullable=True),
        sa.Column("filename", sa.Text, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("resend_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.UniqueConstraint("sha256", name="uq_documents_sha256"),
        sa.UniqueConstraint("content_key", name="uq_documents_content_key"),
        sa.CheckConstraint(
            "state IN ('pending', 'forwarded', 'failed')", name="ck_documents_state"
        ),
    )
    op.create_index("ix_documents_state_next_attempt_at", "documents", ["state", "next_attempt_at"])
    op.create_table(
        "sightings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("mailbox", sa.Text, nullable=False),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("part", sa.Text, nullable=False),
        sa.Column("received_at", _timestamp(), nullable=False),
        sa.Column("mail_date", _timestamp(), nullable=True),
        sa.Column("message_id", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("sender", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("subject", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("filename", sa.Text, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("sha256", sa.Text, nullable=True),
        sa.Column("fingerprint", sa.Text, nullable=True),
        sa.Column("invoice_number", sa.Text, nullable=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", name="fk_sightings_document_id_documents"),
            nullable=True,
        ),
        sa.Column(
            "duplicate_of",
            sa.Integer,
            sa.ForeignKey("sightings.id", name="fk_sightings_duplicate_of_sightings"),
            nullable=True,
        ),
        sa.Column("tries", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.UniqueConstraint("mailbox", "uidvalidity", "uid", "part", name="uq_sightings_location"),
        sa.CheckConstraint(
            "kind IN ('document', 'duplicate', 'rejected', 'error', 'no_pdf')",
            name="ck_sightings_kind",
        ),
    )
    op.create_index("ix_sightings_document_id", "sightings", ["document_id"])
    op.create_index("ix_sightings_received_at", "sightings", ["received_at"])
    op.create_index("ix_sightings_invoice_number", "sightings", ["invoice_number"])
    op.execute(AUDIT_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW audit_log")
    op.drop_index("ix_sightings_invoice_number", table_name="sightings")
    op.drop_index("ix_sightings_received_at", table_name="sightings")
    op.drop_index("ix_sightings_document_id", table_name="sightings")
    op.drop_table("sightings")
    op.drop_index("ix_documents_state_next_attempt_at", table_name="documents")
    op.drop_table("documents")
    op.drop_table("mailbox_state")
