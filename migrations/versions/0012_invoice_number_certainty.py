"""Whether a PDF's invoice number was read unambiguously.

Revision ID: 0012_invoice_number_certainty
Revises: 0008_gmi_delivery
Create Date: 2026-12-08

`sightings.invoice_number_ambiguous` is true when the first pages read as several
different invoice numbers; `invoice_number` stays the first of them, as the audit has
always shown it. A document is uploaded to GetMyInvoices with its `documentNumber` only
when the number is not ambiguous, and a retry from the database knows which it is.
Sightings recorded before this revision have NULL: their number counts as read
unambiguously, as it did when they were recorded. The audit view is unchanged.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_invoice_number_certainty"
down_revision: str | None = "0014_delivery_attempts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sightings", sa.Column("invoice_number_ambiguous", sa.Boolean))


def downgrade() -> None:
    # SQLite (3.35 and later) drops a column in place: no index, key or view uses it.
    op.drop_column("sightings", "invoice_number_ambiguous")
