"""The transactions every SQL query module shares: BEGIN IMMEDIATE writers on SQLite,
read-only readers, the dialect's INSERT (for ON CONFLICT), errors translated once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from worker.db import READ_ONLY_OPTION, translated

Insert = postgresql.Insert | sqlite.Insert


class SqlBase:
    """Holds the engine (made by `worker.db.make_engine`: its SQLite hooks matter)."""

    _engine: Engine

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _postgresql(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def _insert(self, table: sa.Table) -> Insert:
        return postgresql.insert(table) if self._postgresql else sqlite.insert(table)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with translated(self._engine.url), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with translated(self._engine.url), self._engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            with connection.begin():
                yield connection
