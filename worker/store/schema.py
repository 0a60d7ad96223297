"""Tables, the `audit_log` view and engines (migrations: worker/store/migrate.py).

With the store modules (`store`, `sql`, `recording`, `queue`, `notices`, `migrate`), the
only code that imports SQLAlchemy. The table and column names are
public: the accountant queries them (and above all the `audit_log` view) with plain SQL.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from worker.errors import StoreError
from worker.relay.retry import DATABASE_WAIT_SECONDS

SUPPORTED_BACKENDS: Final = ("sqlite", "postgresql")

# A connection carrying this execution option opens its SQLite transaction with a plain
# (deferred) BEGIN; every other transaction starts with BEGIN IMMEDIATE so that writers
# queue on busy_timeout instead of failing when a read lock cannot be upgraded.
READ_ONLY_OPTION: Final = "invoice_relay_read_only"


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back as an aware UTC datetime.

    SQLite has no time zones: values are stored as naive UTC text. A naive value handed
    in (a mail's Date header without a zone) is taken as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

mailbox_state = sa.Table(
    "mailbox_state",
    metadata,
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("last_uid", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=True),
    # = fingerprint only when the document was claimed in content dedup mode
    sa.Column("content_key", sa.Text, nullable=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
    sa.Column("lease_until", UtcDateTime(), nullable=True),
    sa.Column("forwarded_message_id", sa.Text, nullable=True),
    sa.Column("forwarded_at", UtcDateTime(), nullable=True),
    sa.Column("last_answer", sa.Text, nullable=True),
    sa.Column("filename", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("resend_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("sha256", name="uq_documents_sha256"),
    sa.UniqueConstraint("content_key", name="uq_documents_content_key"),
    sa.CheckConstraint("state IN ('pending', 'forwarded', 'failed')", name="ck_documents_state"),
    sa.Index("ix_documents_state_next_attempt_at", "state", "next_attempt_at"),
)

# A document's PDF while it is still needed (until forwarded, unless KEEP_PDFS). Apart
# from `documents`, so that changing a document's state never rewrites its bytes (SQLite
# rewrites a whole row, blob included), and so that a large PDF is written through
# SQLite's blob I/O into a row whose last column is the blob (zeroblob then stays lazy).
document_contents = sa.Table(
    "document_contents",
    metadata,
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_document_contents_document_id_documents"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("content", sa.LargeBinary, nullable=False),
)

sightings = sa.Table(
    "sightings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("mailbox", sa.Text, nullable=False),
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("uid", sa.BigInteger, nullable=False),
    sa.Column("part", sa.Text, nullable=False),
    sa.Column("received_at", UtcDateTime(), nullable=False),
    sa.Column("mail_date", UtcDateTime(), nullable=True),
    sa.Column("message_id", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("sender", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("subject", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("filename", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.Text, nullable=True),
    sa.Column("fingerprint", sa.Text, nullable=True),
    sa.Column("invoice_number", sa.Text, nullable=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_sightings_document_id_documents"),
        nullable=True,
    ),
    sa.Column(
        "duplicate_of",
        sa.Integer,
        sa.ForeignKey("sightings.id", name="fk_sightings_duplicate_of_sightings"),
        nullable=True,
    ),
    sa.Column("tries", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.UniqueConstraint("mailbox", "uidvalidity", "uid", "part", name="uq_sightings_location"),
    sa.CheckConstraint(
        "kind IN ('document', 'duplicate', 'rejected', 'error', 'no_pdf')",
        name="ck_sightings_kind",
    ),
    sa.Index("ix_sightings_document_id", "document_id"),
    sa.Index("ix_sightings_received_at", "received_at"),
    sa.Index("ix_sightings_invoice_number", "invoice_number"),
)

# Failure notices (worker.relay.notify): one row per summary mail, and the failed documents it
# covered, so that no row is notified twice.
notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sent_at", UtcDateTime(), nullable=False),
    sa.Column("recipient", sa.Text, nullable=False),
    # every rejected/error sighting up to this id was covered
    sa.Column("last_sighting_id", sa.Integer, nullable=False),
    sa.Column("failed_documents", sa.Integer, nullable=False),
    sa.Column("problem_sightings", sa.Integer, nullable=False),
)

notified_documents = sa.Table(
    "notified_documents",
    metadata,
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_notified_documents_document_id_documents"),
        primary_key=True,
    ),
    sa.Column(
        "notification_id",
        sa.Integer,
        sa.ForeignKey(
            "notifications.id", name="fk_notified_documents_notification_id_notifications"
        ),
        nullable=False,
    ),
)

# OAuth2 tokens (worker.store.tokens), one row per identity (provider, tenant, client, user).
# Only sealed values (AES-GCM, worker.auth.crypto): no plaintext token is ever stored, and
# no view reads this table.
oauth_tokens = sa.Table(
    "oauth_tokens",
    metadata,
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("sealed_access", sa.LargeBinary),
    sa.Column("access_expires_at", UtcDateTime()),
    sa.Column("sealed_refresh", sa.LargeBinary),
    sa.Column("origin", sa.Text),  # keyed digest of the configured refresh token
    sa.Column("refreshed_at", UtcDateTime()),
)

# The view's current definition. Migrations carry their own frozen copy; a test checks
# that both yield the same columns.
AUDIT_VIEW_SQL: Final = """
CREATE VIEW audit_log AS
SELECT
    s.id AS id,
    s.received_at AS received_at,
    s.mail_date AS mail_date,
    s.mailbox AS mailbox,
    s.uidvalidity AS uidvalidity,
    s.uid AS uid,
    s.message_id AS message_id,
    s.sender AS sender,
    s.subject AS subject,
    s.filename AS filename,
    s.size_bytes AS size_bytes,
    s.sha256 AS sha256,
    s.fingerprint AS fingerprint,
    s.invoice_number AS invoice_number,
    CASE WHEN s.kind = 'document' THEN d.state ELSE s.kind END AS outcome,
    CASE
        WHEN s.kind = 'document' AND d.state = 'failed' THEN COALESCE(d.last_answer, s.reason)
        ELSE s.reason
    END AS reason,
    s.duplicate_of AS duplicate_of,
    CASE WHEN s.kind = 'document' THEN d.forwarded_at END AS forwarded_at,
    CASE WHEN s.kind = 'document' THEN d.forwarded_message_id END AS forwarded_message_id,
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
"""

AUDIT_COLUMNS: Final = (
    "id",
    "received_at",
    "mail_date",
    "mailbox",
    "uidvalidity",
    "uid",
    "message_id",
    "sender",
    "subject",
    "filename",
    "size_bytes",
    "sha256",
    "fingerprint",
    "invoice_number",
    "outcome",
    "reason",
    "duplicate_of",
    "forwarded_at",
    "forwarded_message_id",
    "attempts",
)

# The view described for reading only; kept out of `metadata` so that create_all and
# Alembic's comparison never take it for a table.
view_metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log",
    view_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("received_at", UtcDateTime()),
    sa.Column("mail_date", UtcDateTime()),
    sa.Column("mailbox", sa.Text),
    sa.Column("uidvalidity", sa.BigInteger),
    sa.Column("uid", sa.BigInteger),
    sa.Column("message_id", sa.Text),
    sa.Column("sender", sa.Text),
    sa.Column("subject", sa.Text),
    sa.Column("filename", sa.Text),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("sha256", sa.Text),
    sa.Column("fingerprint", sa.Text),
    sa.Column("invoice_number", sa.Text),
    sa.Column("outcome", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("duplicate_of", sa.Integer),
    sa.Column("forwarded_at", UtcDateTime()),
    sa.Column("forwarded_message_id", sa.Text),
    sa.Column("attempts", sa.Integer),
)


def create_schema(engine: Engine) -> None:
    """Create the current tables and view directly (tests); production uses migrations."""
    with translated(engine.url), engine.begin() as connection:
        metadata.create_all(connection)
        connection.exec_driver_sql(AUDIT_VIEW_SQL)


# --- engines and errors ------------------------------------------------------------


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
    """Every password the URL carries: in its user info and in its query string."""
    found = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if key.lower() == "password":
            found.extend([value] if isinstance(value, str) else list(value))
    return [password for password in found if password]


def describe(url: URL) -> str:
    """The URL for messages: every password masked, the query string's included."""
    masked = {key: "MASKED" for key in url.query if key.lower() == "password"}
    text = url.update_query_dict(masked).render_as_string(hide_password=True)
    return text.replace(":***@", ":****@", 1).replace("MASKED", "****")


def translate(exc: SQLAlchemyError, url: URL) -> StoreError:
    """A StoreError naming the database (password hidden) and the driver's complaint."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        lines = str(exc.orig).strip().splitlines()
        detail = lines[0] if lines else type(exc.orig).__name__
    else:
        # SQLAlchemy's own text may quote statements and parameters (PDF bytes).
        detail = type(exc).__name__
    for password in _passwords(url):
        detail = detail.replace(password, "****")
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


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine set up for the relay: WAL and BEGIN IMMEDIATE on SQLite, pre-ping on PostgreSQL.

    A SQLite file's directory is created when missing (the default lives under
    $XDG_DATA_HOME, which may not exist yet).
    """
    parsed = parse_url(url)
    with translated(parsed):
        if parsed.get_backend_name() == "postgresql":
            return sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{describe(parsed)}: {exc.strerror}") from exc
        engine = sa.create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine


# --- migrations ----------------------------------------------------------------------
