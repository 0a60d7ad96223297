"""OAuth2 tokens, sealed, one row per identity.

Revision ID: 0007_oauth_tokens
Revises: 0006_mail_actions
Create Date: 2026-12-01

`oauth_tokens` keeps each identity's (provider, tenant, client, user) access token and
refresh token, encrypted with INVOICE_RELAY_SECRET_KEY_FILE; a refresh locks the row. The
audit view never reads it.

Migrations are frozen history: never import the current tables from worker.store.schema here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_oauth_tokens"
down_revision: str | None = "0006_mail_actions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "oauth_tokens",
        sa.Column("identity", sa.Text, primary_key=True),
        sa.Column("sealed_access", sa.LargeBinary),
        sa.Column("access_expires_at", sa.DateTime(timezone=True)),
        sa.Column("sealed_refresh", sa.LargeBinary),
        sa.Column("origin", sa.Text),
        sa.Column("refreshed_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
