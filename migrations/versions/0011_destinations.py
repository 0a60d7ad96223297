"""Destinations and routes: dedup per destination, the mailbox that introduced each
document, each sighting's route, the per-route fire-time claims and last polls, and
`audit_log.route` and `audit_log.destination`.

Revision ID: 0011_destinations
Revises: 0008_gmi_delivery
Create Date: 2026-12-08

`documents` were unique by SHA-256 (and content key) across everything; now by
(destination, SHA-256) and (destination, content key). The migration reads no
configuration: every document that exists when it runs gets destination NULL, which
the store treats as known to every destination, so nothing already forwarded is
forwarded again anywhere. `documents.mailbox` is filled from the document's
introducing sighting: a pending document is still delivered by the route on the folder
whose mail introduced it. Sightings recorded before it have no route (the view shows
`default`).

SQLite cannot drop a table's UNIQUE constraint: `documents` is rebuilt (copied aside,
dropped, created anew, copied back) with foreign keys deferred to the commit, so the
rows that name a document (sightings, contents, notices) find it again by then.

The downgrade refuses while two documents share a SHA-256 or content key (documents of
several destinations): the old uniqueness cannot hold them.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_destinations"
# MERGE: numbered by its issue; it follows the head of the chain when merged.
down_revision: str | None = "0012_invoice_number_certainty"
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
        WHEN s.kind = 'document' AND d.state = 'pending' THEN COALESCE(d.held_reason, s.reason)
        ELSE s.reason
    END AS reason,
    s.duplicate_of AS duplicate_of,
    CASE WHEN s.kind = 'document' THEN d.forwarded_at END AS forwarded_at,
    CASE WHEN s.kind = 'document' THEN d.forwarded_message_id END AS forwarded_message_id,
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts,
    CASE WHEN m.state = 'done' THEN m.action END AS mail_action,
    CASE WHEN s.kind = 'document' THEN d.delivered_via END AS delivered_via,
    CASE WHEN s.kind = 'document' THEN d.delivery_id END AS delivery_id"""

_FROM = """
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
LEFT JOIN mail_actions AS m
    ON m.mailbox = s.mailbox AND m.uidvalidity = s.uidvalidity AND m.uid = s.uid
"""

# The view as 0008_gmi_delivery left it (restored by the downgrade).
PREVIOUS_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS}{_FROM}"""

AUDIT_VIEW_SQL = f"""
CREATE VIEW audit_log AS
SELECT{_COLUMNS},
    COALESCE(s.route, 'default') AS route,
    d.destination AS destination{_FROM}"""

# The columns of `documents` as 0008 left them, in their order.
_PREVIOUS_DOCUMENT_COLUMNS = (
    "id",
    "sha256",
    "fingerprint",
    "content_key",
    "state",
    "attempts",
    "next_attempt_at",
    "lease_until",
    "forwarded_message_id",
    "forwarded_at",
    "last_answer",
    "filename",
    "size_bytes",
    "resend_count",
    "created_at",
    "lease_owner",
    "upload_started_at",
    "delivered_via",
    "delivery_id",
    "held_reason",
)
_NEW_DOCUMENT_COLUMNS = (*_PREVIOUS_DOCUMENT_COLUMNS, "destination", "mailbox")

_OLD_UNIQUES = (("uq_documents_sha256", ["sha256"]), ("uq_documents_content_key", ["content_key"]))
_NEW_UNIQUES = (
    ("uq_documents_destination_sha256", ["destination", "sha256"]),
    ("uq_documents_destination_content_key", ["destination", "content_key"]),
)
_OLD_INDEXES = (
    ("ix_documents_state_next_attempt_at", ["state", "next_attempt_at"]),
    ("ix_documents_lease_owner", ["lease_owner"]),
)
_NEW_INDEXES = (
    ("ix_documents_sha256", ["sha256"]),
    ("ix_documents_content_key", ["content_key"]),
    ("ix_documents_mailbox_state", ["mailbox", "state"]),
)


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _document_columns(*, with_routes: bool) -> list[sa.Column[object]]:
    columns: list[sa.Column[object]] = [
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
        sa.Column("filename", sa.Text, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("resend_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("lease_owner", sa.Text, nullable=True),
        sa.Column("upload_started_at", _timestamp(), nullable=True),
        sa.Column("delivered_via", sa.Text, nullable=True),
        sa.Column("delivery_id", sa.Text, nullable=True),
        sa.Column("held_reason", sa.Text, nullable=True),
    ]
    if with_routes:
        columns += [
            sa.Column("destination", sa.Text, nullable=True),
            sa.Column("mailbox", sa.Text, nullable=True),
        ]
    return columns


def _rebuild_documents_on_sqlite(*, with_routes: bool) -> None:
    """`documents` created anew with the other revision's columns and keys, its rows
    (ids included) copied back. Foreign keys are checked at the commit only: meanwhile
    the rows naming a document have none."""
    columns = _NEW_DOCUMENT_COLUMNS if with_routes else _PREVIOUS_DOCUMENT_COLUMNS
    uniques = _NEW_UNIQUES if with_routes else _OLD_UNIQUES
    listed = ", ".join(columns)
    op.execute("PRAGMA defer_foreign_keys = ON")  # until this transaction ends
    op.execute("CREATE TEMP TABLE documents_0011 AS SELECT * FROM documents")
    op.drop_table("documents")
    op.create_table(
        "documents",
        *_document_columns(with_routes=with_routes),
        *(sa.UniqueConstraint(*keys, name=name) for name, keys in uniques),
        sa.CheckConstraint("state IN ('pending', 'forwarded', 'failed')", name="ck_documents_state"),
    )
    op.execute(f"INSERT INTO documents ({listed}) SELECT {listed} FROM documents_0011")  # noqa: S608 - fixed names
    op.execute("DROP TABLE documents_0011")
    for name, keys in _OLD_INDEXES + (_NEW_INDEXES if with_routes else ()):
        op.create_index(name, "documents", keys)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute("DROP VIEW audit_log")
    op.add_column("documents", sa.Column("destination", sa.Text, nullable=True))
    op.add_column("documents", sa.Column("mailbox", sa.Text, nullable=True))
    op.add_column("sightings", sa.Column("route", sa.Text, nullable=True))
    op.execute(
        "UPDATE documents SET mailbox = (SELECT s.mailbox FROM sightings AS s"
        " WHERE s.document_id = documents.id AND s.kind = 'document'"
        " ORDER BY s.id LIMIT 1)"
    )
    if sqlite:
        _rebuild_documents_on_sqlite(with_routes=True)
    else:
        for name, _keys in _OLD_UNIQUES:
            op.drop_constraint(name, "documents", type_="unique")
        for name, keys in _NEW_UNIQUES:
            op.create_unique_constraint(name, "documents", keys)
        for name, keys in _NEW_INDEXES:
            op.create_index(name, "documents", keys)
    op.create_table(
        "poll_claims",
        sa.Column("route", sa.Text, primary_key=True),
        sa.Column("fire_time", _timestamp(), primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("claimed_at", _timestamp(), nullable=False),
    )
    op.create_table(
        "route_polls",
        sa.Column("route", sa.Text, primary_key=True),
        sa.Column("last_started_at", _timestamp(), nullable=False),
        sa.Column("last_finished_at", _timestamp(), nullable=False),
        sa.Column("last_success_at", _timestamp(), nullable=True),
        sa.Column("last_result", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("owner", sa.Text, nullable=False),
    )
    op.execute(AUDIT_VIEW_SQL)


def _refuse_shared_keys() -> None:
    bind = op.get_bind()
    for key in ("sha256", "content_key"):
        shared = bind.execute(
            sa.text(
                f"SELECT {key} FROM documents WHERE {key} IS NOT NULL"  # noqa: S608 - fixed names
                f" GROUP BY {key} HAVING COUNT(*) > 1 LIMIT 1"
            )
        ).scalar_one_or_none()
        if shared is not None:
            raise RuntimeError(
                f"cannot downgrade below 0011_destinations: documents of several destinations"
                f" share the {key} {shared}; the previous revision allows one document per {key}"
            )


def downgrade() -> None:
    _refuse_shared_keys()
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute("DROP VIEW audit_log")
    op.drop_table("route_polls")
    op.drop_table("poll_claims")
    if sqlite:
        _rebuild_documents_on_sqlite(with_routes=False)
    else:
        for name, _keys in _NEW_INDEXES:
            op.drop_index(name, table_name="documents")
        for name, _keys in _NEW_UNIQUES:
            op.drop_constraint(name, "documents", type_="unique")
        op.drop_column("documents", "mailbox")
        op.drop_column("documents", "destination")
        for name, keys in _OLD_UNIQUES:
            op.create_unique_constraint(name, "documents", keys)
    # SQLite (3.35 and later) drops a column in place: no index, key or view uses it.
    op.drop_column("sightings", "route")
    op.execute(PREVIOUS_VIEW_SQL)
