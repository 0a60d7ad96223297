"""A stable reason code beside a sighting's reason text.

Revision ID: 0004_reason_codes
Revises: 0003_document_contents
Create Date: 2026-12-01

The failure notices leave out our own notice come back to the polled mailbox; they used
to find those rows by comparing the English reason text in SQL, so rewording the reason
would have made every notice report the previous one. `sightings.reason_code` holds
`worker.models.ReasonCode` values; the rows written before it get their code from the
text they were written with. The `audit_log` view is unchanged.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_reason_codes"
down_revision: str | None = "0003_document_contents"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: the text the notice loop's rows were written with, and its code.
_NOTICE_LOOP_REASON = "loop: an invoice-relay failure notice (X-Invoice-Relay-Notice)"
_NOTICE_LOOP_CODE = "notice_loop"


def upgrade() -> None:
    op.add_column("sightings", sa.Column("reason_code", sa.Text, nullable=True))
    op.execute(
        sa.text("UPDATE sightings SET reason_code = :code WHERE reason = :reason").bindparams(
            code=_NOTICE_LOOP_CODE, reason=_NOTICE_LOOP_REASON
        )
    )


def downgrade() -> None:
    # SQLite (3.35 and later) drops a column in place: no index, key or view uses it.
    op.drop_column("sightings", "reason_code")
