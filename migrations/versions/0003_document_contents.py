"""Documents' PDFs in a table of their own.

Revision ID: 0003_document_contents
Revises: 0002_notifications
Create Date: 2026-11-24

`documents.content` moves to `document_contents` (one row per document whose PDF is
still kept). SQLite rewrites a whole row on every UPDATE, so each lease and each state
change of a document used to copy its PDF; and a large PDF could not be written through
blob I/O without SQLite building the whole row in memory first.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_document_contents"
down_revision: str | None = "0002_notifications"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "document_contents",
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", name="fk_document_contents_document_id_documents"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    op.execute(
        "INSERT INTO document_contents (document_id, content) "
        "SELECT id, content FROM documents WHERE content IS NOT NULL"
    )
    # SQLite (3.35 and later) drops a column in place: no index, key or view uses it.
    op.drop_column("documents", "content")


def downgrade() -> None:
    op.add_column("documents", sa.Column("content", sa.LargeBinary, nullable=True))
    op.execute(
        "UPDATE documents SET content = (SELECT c.content FROM document_contents c "
        "WHERE c.document_id = documents.id)"
    )
    op.drop_table("document_contents")
