"""The transactions every SQL query module shares: BEGIN IMMEDIATE writers on SQLite,
read-only readers, the dialect's INSERT (for ON CONFLICT), errors translated once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from worker.store.schema import READ_ONLY_OPTION, document_contents, translated

Insert = postgresql.Insert | sqlite.Insert

# From this size, SQLite blobs are written and read through its incremental blob I/O:
# a bound parameter or a selected column is copied whole once more inside sqlite3.
LARGE_BLOB = 1 << 20
_BLOB_SLICE = 1 << 20


class SqlBase:
    """Holds the engine (made by `worker.store.schema.make_engine`: its SQLite hooks matter)."""

    _engine: Engine

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _postgresql(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def _insert(self, table: sa.Table) -> Insert:
        return postgresql.insert(table) if self._postgresql else sqlite.insert(table)

    def _store_content(self, connection: Connection, document_id: int, data: bytes) -> None:
        """A document's PDF into `document_contents`, in this transaction. Large ones go
        into SQLite 1 MiB at a time through blob I/O: the row is inserted with a zeroblob
        as its last column, which SQLite keeps lazy, so the PDF is never copied whole."""
        streamed = not self._postgresql and len(data) >= LARGE_BLOB
        connection.execute(
            sa.insert(document_contents).values(
                document_id=document_id,
                content=sa.func.zeroblob(len(data)) if streamed else data,
            )
        )
        if streamed:
            with _sqlite(connection).blobopen(
                document_contents.name, "content", document_id
            ) as blob:
                view = memoryview(data)
                for start in range(0, len(view), _BLOB_SLICE):
                    blob.write(view[start : start + _BLOB_SLICE])

    def _selected_content(self) -> sa.ColumnElement[bytes | None]:
        """`document_contents.content` for a SELECT: on SQLite NULL from LARGE_BLOB on,
        for `_read_content` to read without the copy `sqlite3` makes of a column."""
        stored = document_contents.c.content
        if self._postgresql:
            return stored
        return sa.case((sa.func.length(stored) < LARGE_BLOB, stored), else_=sa.null())

    def _read_content(self, connection: Connection, document_id: int) -> bytes:
        """A document's PDF read from SQLite's blob I/O straight into the bytes returned."""
        with _sqlite(connection).blobopen(
            document_contents.name, "content", document_id, readonly=True
        ) as blob:
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
