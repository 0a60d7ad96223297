"""The status page's server-side sessions (`worker.relay.ports.WebSessionStore`)."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from worker.models import WebSession
from worker.store.engine import SqlBase
from worker.store.schema import web_sessions


class WebSessionRows(SqlBase):
    """Rows of `web_sessions`. Raises `StoreError` when the database fails."""

    def start_session(self, *, token_hash: str, user: str, csrf_token: str, now: datetime) -> None:
        with self._write() as connection:
            connection.execute(
                sa.insert(web_sessions).values(
                    token_hash=token_hash,
                    user_name=user,
                    csrf_token=csrf_token,
                    created_at=now,
                    last_seen_at=now,
                )
            )

    def live_session(
        self, *, token_hash: str, now: datetime, idle_seconds: float
    ) -> WebSession | None:
        oldest = now - timedelta(seconds=idle_seconds)
        with self._write() as connection:
            # Expired sessions of everyone go here, so that the table never grows.
            connection.execute(sa.delete(web_sessions).where(web_sessions.c.last_seen_at < oldest))
            row = connection.execute(
                sa.update(web_sessions)
                .where(web_sessions.c.token_hash == token_hash)
                .values(last_seen_at=now)
                .returning(
                    web_sessions.c.user_name,
                    web_sessions.c.csrf_token,
                    web_sessions.c.created_at,
                )
            ).first()
        if row is None:
            return None
        return WebSession(
            user=row.user_name,
            csrf_token=row.csrf_token,
            created_at=row.created_at,
            last_seen_at=now,
        )

    def end_session(self, *, token_hash: str) -> None:
        with self._write() as connection:
            connection.execute(
                sa.delete(web_sessions).where(web_sessions.c.token_hash == token_hash)
            )
