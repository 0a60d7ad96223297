"""Delivery through the GetMyInvoices API: the upload-started mark, how and under which
id each document was delivered, the API budgets, and `audit_log.delivered_via` and
`audit_log.delivery_id`.

Revision ID: 0008_gmi_delivery
Revises: 0010_web_sessions
Create Date: 2026-12-01

`sightings.credit_note` records that a PDF's first pages read as a credit note.
`held_reason` says why a pending document waits for a limit; the view's `reason` shows
it while the document is pending. Documents forwarded before this revision went by SMTP: they get `delivered_via` 'smtp'
and their Message-ID as `delivery_id`. The view gains the two columns at its end and
keeps every other column as it was.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_gmi_delivery"
# Numbered 0008 when it was written; it follows the head of `layout` when merged.
down_revision: str | None = "0010_web_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS_HEAD = """
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
    CASE WHEN s.kind = 'document' THEN d.state ELSE s.kind END AS outcome,"""

_PREVIOUS_REASON = """
    CASE
        WHEN s.kind = 'document' AND d.state = 'failed' THEN COALESCE(d.last_answer, s.reason)
        ELSE s.reason
    END AS reason,"""

# A document waiting for the API's limit shows why, and until when.
_REASON = """
    CASE
        WHEN s.kind = 'document' AND d.state = 'failed' THEN COALESCE(d.last_answer, s.reason)
        WHEN s.kind = 'document' AND d.state = 'pending' THEN COALESCE(d.held_reason, s.reason)
        ELSE s.reason
    END AS reason,"""

_COLUMNS_TAIL = """
    s.duplicate_of AS duplicate_of,
    CASE WHEN s.kind = 'document' THEN d.forwarded_at END AS forwarded_at,
    CASE WHEN s.kind = 'document' THEN d.forwarded_message_id END AS forwarded_message_id,
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts,
    CASE WHEN m.state = 'done' THEN m.action END AS mail_action"""

_FROM = """
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
LEFT JOIN mail_actions AS m
    ON m.mailbox = s.mailbox AND m.uidvalidity = s.uidvalidity AND m.uid = s.uid
"""

# The view as the previous revision left it (restored by the downgrade).
PREVIOUS_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS_HEAD}{_PREVIOUS_REASON}{_COLUMNS_TAIL}{_FROM}"""

AUDIT_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS_HEAD}{_REASON}{_COLUMNS_TAIL},
    CASE WHEN s.kind = 'document' THEN d.delivered_via END AS delivered_via,
    CASE WHEN s.kind = 'document' THEN d.delivery_id END AS delivery_id{_FROM}"""


def upgrade() -> None:
    op.execute("DROP VIEW audit_log")
    op.add_column("documents", sa.Column("upload_started_at", sa.DateTime(timezone=True)))
    op.add_column("documents", sa.Column("delivered_via", sa.Text))
    op.add_column("documents", sa.Column("delivery_id", sa.Text))
    op.add_column("documents", sa.Column("held_reason", sa.Text))
    op.add_column("sightings", sa.Column("credit_note", sa.Boolean))
    op.execute(
        "UPDATE documents SET delivered_via = 'smtp', delivery_id = forwarded_message_id"
        " WHERE forwarded_message_id IS NOT NULL"
    )
    op.create_table(
        "delivery_budgets",
        sa.Column("destination", sa.Text, primary_key=True),
        sa.Column("window", sa.Text, primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.Integer, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    op.execute(AUDIT_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW audit_log")
    op.drop_table("delivery_budgets")
    # SQLite (3.35 and later) drops a column in place: no index, key or view uses them
    # (the view is dropped first).
    op.drop_column("sightings", "credit_note")
    op.drop_column("documents", "held_reason")
    op.drop_column("documents", "delivery_id")
    op.drop_column("documents", "delivered_via")
    op.drop_column("documents", "upload_started_at")
    op.execute(PREVIOUS_VIEW_SQL)
