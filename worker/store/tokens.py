"""`TokenStore`: the `worker.tokens.TokenRows` port on SQLAlchemy, for SQLite and PostgreSQL.

Rows hold only sealed values (worker.auth.crypto seals them); this module never sees a
token. A refresh locks the identity's row for its whole transaction: on PostgreSQL the
row is created if missing (INSERT ... ON CONFLICT DO NOTHING, so the database decides)
and then `SELECT ... FOR UPDATE`; on SQLite every writing transaction begins with
`BEGIN IMMEDIATE` (worker.store.schema), which already excludes every other writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from worker.store.engine import SqlBase
from worker.store.schema import oauth_tokens
from worker.tokens import StoredToken


class _LockedRow:
    """`worker.tokens.TokenLock`: the row re-read under the lock, and its write."""

    def __init__(self, connection: Connection, key: str, current: StoredToken | None) -> None:
        self._connection = connection
        self._key = key
        self._current = current

    @property
    def current(self) -> StoredToken | None:
        return self._current

    def save(self, row: StoredToken) -> None:
        if row.key != self._key:
            raise ValueError("a locked token row can only be saved under its own key")
        values = _values(row)
        updated = self._connection.execute(
            sa.update(oauth_tokens).where(oauth_tokens.c.identity == self._key).values(values)
        )
        if updated.rowcount == 0:  # SQLite: the identity's first token
            self._connection.execute(sa.insert(oauth_tokens).values(identity=self._key, **values))
        self._current = row


class TokenStore(SqlBase):
    """Sealed OAuth2 tokens per identity. Raises `StoreError` when the database fails."""

    def read_token(self, key: str) -> StoredToken | None:
        with self._read() as connection:
            row = connection.execute(
                sa.select(oauth_tokens).where(oauth_tokens.c.identity == key)
            ).one_or_none()
        return None if row is None else _stored(row)

    @contextmanager
    def lock_token(self, key: str) -> Iterator[_LockedRow]:
        with self._write() as connection:
            select = sa.select(oauth_tokens).where(oauth_tokens.c.identity == key)
            if self._postgresql:
                # FOR UPDATE locks only a row that exists: make sure it does first.
                connection.execute(
                    self._insert(oauth_tokens)
                    .values(identity=key)
                    .on_conflict_do_nothing(index_elements=["identity"])
                )
                select = select.with_for_update()
            row = connection.execute(select).one_or_none()
            current = None if row is None or _empty(row) else _stored(row)
            yield _LockedRow(connection, key, current)


def _empty(row: Row[tuple[object, ...]]) -> bool:
    return row.sealed_access is None and row.sealed_refresh is None


def _stored(row: Row[tuple[object, ...]]) -> StoredToken:
    return StoredToken(
        key=row.identity,
        sealed_access=row.sealed_access,
        access_expires_at=row.access_expires_at,
        sealed_refresh=row.sealed_refresh,
        origin=row.origin,
        refreshed_at=row.refreshed_at,
    )


def _values(row: StoredToken) -> dict[str, object]:
    return {
        "sealed_access": row.sealed_access,
        "access_expires_at": row.access_expires_at,
        "sealed_refresh": row.sealed_refresh,
        "origin": row.origin,
        "refreshed_at": row.refreshed_at,
    }
