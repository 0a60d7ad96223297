"""What INVOICE_RELAY_AFTER_FORWARD did to each mail, and `audit_log.mail_action`.

Revision ID: 0006_mail_actions
Revises: 0005_leases
Create Date: 2026-12-01

One row per mail (mailbox, UIDVALIDITY, UID) in `mail_actions`; the view gains the
column `mail_action` at its end and keeps every other column as it was.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_mail_actions"
down_revision: str | None = "0005_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = """
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
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts"""

# The view as the previous revision left it (restored by the downgrade).
PREVIOUS_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS}
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
"""

AUDIT_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS},
    CASE WHEN m.state = 'done' THEN m.action END AS mail_action
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
LEFT JOIN mail_actions AS m
    ON m.mailbox = s.mailbox AND m.uidvalidity = s.uidvalidity AND m.uid = s.uid
"""


def upgrade() -> None:
    op.create_table(
        "mail_actions",
        sa.Column("mailbox", sa.Text, primary_key=True),
        sa.Column("uidvalidity", sa.BigInteger, primary_key=True),
        sa.Column("uid", sa.BigInteger, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('copying', 'done', 'skipped')", name="ck_mail_actions_state"
        ),
    )
    op.execute("DROP VIEW audit_log")
    op.execute(AUDIT_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW audit_log")
    op.execute(PREVIOUS_VIEW_SQL)
    op.drop_table("mail_actions")
