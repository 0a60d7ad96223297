"""Engines and transactions: the URL parsed, SQLite set up (WAL, BEGIN IMMEDIATE for
writers, a busy wait), errors translated once into `StoreError` with the password
masked, and `SqlBase`, which every query module of the store builds on.

With the other store modules, the only code that imports SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from worker.errors import StoreError
from worker.logs import MASK, mask_url, url_passwords
from worker.models import DATABASE_WAIT_SECONDS, sqlite_file
from worker.store.schema import AUDIT_VIEW_SQL, UtcDateTime, document_contents, metadata

SUPPORTED_BACKENDS: Final = ("sqlite", "postgresql")

# A connection carrying this execution option opens its SQLite transaction with a plain
# (deferred) BEGIN; every other transaction starts with BEGIN IMMEDIATE so that writers
# queue on busy_timeout instead of failing when a read lock cannot be upgraded.
READ_ONLY_OPTION: Final = "invoice_relay_read_only"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


MIGRATION_LOCK_KEY: Final = advisory_key("invoice-relay:migrate")


def parse_url(url: str) -> URL:
    """Parse a database URL; `postgresql://` and `postgres://` mean psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError("not a valid database URL") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise StoreError(
            f"{parsed.render_as_string(hide_password=True)}: only SQLite and PostgreSQL "
            "are supported"
        )
    return parsed


def _passwords(url: URL) -> list[str]:
    """Every password the URL carries, in its user info and its query string: as the
    URL writes them (escaped) and, for the user info, as the driver was given it."""
    found = url_passwords(url.render_as_string(hide_password=False))
    if url.password:
        found.append(str(url.password))
    return list(dict.fromkeys(found))


def describe(url: URL) -> str:
    """The URL for messages, through the one URL masker (`worker.logs.mask_url`)."""
    return mask_url(url.render_as_string(hide_password=False))


def translate(exc: SQLAlchemyError, url: URL) -> StoreError:
    """A StoreError naming the database (password hidden) and the driver's complaint."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        lines = str(exc.orig).strip().splitlines()
        detail = lines[0] if lines else type(exc.orig).__name__
    else:
        # SQLAlchemy's own text may quote statements and parameters (PDF bytes).
        detail = type(exc).__name__
    for password in _passwords(url):
        detail = detail.replace(password, MASK)
    return StoreError(f"{describe(url)}: {detail}")


@contextmanager
def translated(url: URL) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise translate(exc, url) from exc


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin hook emit BEGIN instead of the driver's legacy handling.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        _enter_wal(cursor)  # leaves busy_timeout at DATABASE_WAIT_SECONDS
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _enter_wal(cursor: sqlite3.Cursor) -> None:
    """WAL mode, waiting at most as long as any statement would. Two processes opening a
    fresh file at once both need its exclusive lock to switch the mode; SQLite sees that
    waiting could deadlock and answers "database is locked" at once instead of using
    the busy timeout. One of them switches; the other, trying again, finds WAL set. Each
    try may also wait in the busy handler: it gets only what is left of the wait."""
    full = int(DATABASE_WAIT_SECONDS * 1000)
    deadline = time.monotonic() + DATABASE_WAIT_SECONDS
    pause = 0.01
    try:
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            cursor.execute(f"PRAGMA busy_timeout = {max(left, 0)}")
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {full}")


def _sqlite_on_begin(connection: Connection) -> None:
    read_only = bool(connection.get_execution_options().get(READ_ONLY_OPTION, False))
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


# A relay's transactions run their statements back to back. A session idle inside one
# for this long belongs to a relay that froze or was cut off mid-transaction (a node
# lost without a FIN keeps its session for hours): the server ends it, so the rows it
# locked (a claim that never committed) come free for the replicas that take over.
IDLE_IN_TRANSACTION_SECONDS: Final = 30


def _postgresql_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(
            f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_SECONDS}s'"
        )
    finally:
        cursor.close()
    dbapi_connection.commit()


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine set up for the relay: WAL and BEGIN IMMEDIATE on SQLite, pre-ping on PostgreSQL.

    A SQLite file's directory is created when missing (the default lives under
    $XDG_DATA_HOME, which may not exist yet).
    """
    parsed = parse_url(url)
    with translated(parsed):
        if parsed.get_backend_name() == "postgresql":
            engine = sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
            event.listen(engine, "connect", _postgresql_on_connect)
            return engine
        path = sqlite_file(url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{describe(parsed)}: {exc.strerror}") from exc
        engine = sa.create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine


# --- migrations ----------------------------------------------------------------------


def create_schema(engine: Engine) -> None:
    """Create the current tables and view directly (tests); production uses migrations."""
    with translated(engine.url), engine.begin() as connection:
        metadata.create_all(connection)
        connection.exec_driver_sql(AUDIT_VIEW_SQL)


# --- what the query modules share -------------------------------------------------

Insert = postgresql.Insert | sqlite.Insert

# From this size, SQLite blobs are written and read through its incremental blob I/O:
# a bound parameter or a selected column is copied whole once more inside sqlite3.
LARGE_BLOB = 1 << 20
_BLOB_SLICE = 1 << 20


class SqlBase:
    """Holds the engine (made by `worker.store.engine.make_engine`: its SQLite hooks matter)."""

    _engine: Engine

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _postgresql(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def _db_now(self, plus_seconds: float = 0.0) -> sa.ColumnElement[datetime]:
        """The database's clock (plus a lease's length): leases expire on one clock for
        every replica, whatever each host's clock says. PostgreSQL: the statement's start
        (not the transaction's, which may be older). SQLite: its own clock, which is this
        host's, written as `UtcDateTime` stores it (naive UTC, six fractional digits) so
        that the text compares in time order."""
        if self._postgresql:
            now: sa.ColumnElement[datetime] = sa.func.statement_timestamp()
            if plus_seconds:
                now = now + sa.func.make_interval(0, 0, 0, 0, 0, 0, float(plus_seconds))
            return sa.type_coerce(now, UtcDateTime())
        text = sa.func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{plus_seconds:+.3f} seconds")
        return sa.type_coerce(text.op("||")("000"), UtcDateTime())

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
