"""The transactions every SQL query module shares: BEGIN IMMEDIATE writers on SQLite,
read-only readers, the dialect's INSERT (for ON CONFLICT), errors translated once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from worker.db import READ_ONLY_OPTION, translated

Insert = postgresql.Insert | sqlite.Insert

# From this size, SQLite blobs are written and read through its incremental blob I/O:
# a bound parameter or a selected column is copied whole once more inside sqlite3.
LARGE_BLOB = 1 << 20
_BLOB_SLICE = 1 << 20


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

    def _streams_blob(self, data: bytes | None) -> bool:
        """Whether `data` goes through `_write_blob` instead of a bound parameter."""
        return not self._postgresql and data is not None and len(data) >= LARGE_BLOB

    def _write_blob(
        self, connection: Connection, table: sa.Table, column: str, rowid: int, data: bytes
    ) -> None:
        """Store `data` in one SQLite row's column, 1 MiB at a time, in this transaction."""
        connection.execute(
            sa.update(table)
            .where(table.c.id == rowid)
            .values({column: sa.func.zeroblob(len(data))})
        )
        with _sqlite(connection).blobopen(table.name, column, rowid) as blob:
            view = memoryview(data)
            for start in range(0, len(view), _BLOB_SLICE):
                blob.write(view[start : start + _BLOB_SLICE])

    def _read_blob(self, connection: Connection, table: sa.Table, column: str, rowid: int) -> bytes:
        """One SQLite blob read straight into the bytes returned."""
        with _sqlite(connection).blobopen(table.name, column, rowid, readonly=True) as blob:
            return blob.read()

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


def _sqlite(connection: Connection) -> sqlite3.Connection:
    driver = connection.connection.driver_connection
    if not isinstance(driver, sqlite3.Connection):
        raise TypeError(f"not an SQLite connection: {type(driver).__name__}")
    return driver
