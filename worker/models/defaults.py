"""The defaults: one home for each, and the database facts the settings check early.

The settings give them to a user who sets nothing (README, "Configuration"); the value
objects of the relay and the adapters use the same ones when built without settings
(tests, bench, tools), so a test's "default" is the user's default. Pure: no I/O."""

from __future__ import annotations

from pathlib import Path

MB = 1024 * 1024
DEFAULT_MAX_MAIL_BYTES = 50 * MB  # INVOICE_RELAY_MAX_MAIL_BYTES: a whole mail
DEFAULT_MAX_PDF_BYTES = 30 * MB  # INVOICE_RELAY_MAX_PDF_BYTES: one decoded PDF
DEFAULT_MAX_PARTS = 100  # INVOICE_RELAY_MAX_PARTS: MIME parts per mail, containers included
DEFAULT_MAX_DEPTH = 10  # INVOICE_RELAY_MAX_DEPTH: MIME nesting levels
DEFAULT_MAX_ATTEMPTS = 10  # INVOICE_RELAY_MAX_ATTEMPTS: sends of one document
DEFAULT_ERROR_RETRIES = 3  # INVOICE_RELAY_ERROR_RETRIES: polls that retry a failed mail
DEFAULT_RETRY_DELAY_SECONDS = 60.0  # INVOICE_RELAY_RETRY_DELAY: doubles per attempt
DEFAULT_TIMEOUT_SECONDS = 60.0  # INVOICE_RELAY_TIMEOUT: each IMAP and SMTP wait
DEFAULT_POLL_DEADLINE_SECONDS = 1800.0  # INVOICE_RELAY_POLL_DEADLINE: 30 minutes
DEFAULT_PDF_TIMEOUT_SECONDS = 30.0  # INVOICE_RELAY_PDF_TIMEOUT: one PDF's check
DEFAULT_PDF_MEMORY_MB = 1024  # INVOICE_RELAY_PDF_MEMORY_MB: one PDF worker's address space
DEFAULT_LEASE_SECONDS = (
    30.0  # a claim or poll lease; renewed by the heartbeat while its owner lives
)
DEFAULT_SEND_BATCH = 10  # documents claimed per send session
KEPT_ATTEMPTS = 50  # `delivery_attempts` rows a document keeps: its last tries
DEFAULT_BATCH_BYTES = 64_000_000  # RFC822.SIZE one fetch batch may hold
DEFAULT_HTTP_PORT = 8080  # INVOICE_RELAY_HTTP_PORT: /livez, /healthz, /metrics
DEFAULT_NOTIFY_INTERVAL_SECONDS = 3600.0  # INVOICE_RELAY_NOTIFY_INTERVAL
DEFAULT_GMI_API_URL = "https://api.getmyinvoices.com/accounts/v3"  # INVOICE_RELAY_GMI_API_URL
DEFAULT_GMI_DOCUMENT_TYPE = "SALES_INVOICE"  # INVOICE_RELAY_GMI_DOCUMENT_TYPE
# INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN: a credit note's words, on filename and subject
DEFAULT_GMI_CREDIT_NOTE_PATTERN = (
    r"(?i)gutschrift|avoir|credit[ _-]?note|nota de cr[eé]dito|storno|creditnota"
)
DEFAULT_GMI_CALLS_PER_MINUTE = 60  # INVOICE_RELAY_GMI_CALLS_PER_MINUTE (conservative)
DEFAULT_GMI_CALLS_PER_DAY = 2500  # INVOICE_RELAY_GMI_CALLS_PER_DAY (conservative)
GMI_UPLOADS_PER_HOUR = 100  # the API's own hourly upload limit (its error 105)
# The API's document types (its v3 description lists them in prose).
GMI_DOCUMENT_TYPES = (
    "INCOMING_INVOICE",
    "RECEIPT",
    "PAYMENT_RECEIPT",
    "EXPENSE_REIMBURSEMENT",
    "SALES_INVOICE",
    "CREDIT_NOTE",
    "STATEMENT",
    "DELIVERY_NOTE",
    "ORDER_CONFIRMATION",
    "PAYROLL",
    "COMPANY_REGISTRATION_DOCUMENT",
    "MISC",
    "TRAVEL_EXPENSES",
    "REMINDER",
)
# How long a statement waits for another writer: SQLite's busy_timeout, set by the store
# (`worker.store.engine`); the send lease (`worker.relay.retry.lease_seconds`) allows for
# recording one send's outcome queueing that long.
DATABASE_WAIT_SECONDS = 30.0


def sqlite_location(url: str) -> str | None:
    """The database part of a SQLite URL, as SQLAlchemy reads it ("" or ":memory:" in
    memory, a relative path after three slashes, an absolute one after four); None for
    any other database. Pure text, so that settings can check it before any driver loads."""
    scheme, separator, rest = url.partition("://")
    if not separator or not scheme.lower().startswith("sqlite"):
        return None
    return rest.partition("?")[0].removeprefix("/")


def sqlite_file(url: str) -> Path | None:
    """The SQLite file a URL names; None in memory, for a `file:` URI, or not SQLite."""
    location = sqlite_location(url)
    if location in (None, "", ":memory:") or location.startswith("file:"):
        return None
    return Path(location).expanduser()


# Every row's route until the routes file (shared/DESIGN.md, "Several mailboxes and
# destinations") gives rows routes of their own.
DEFAULT_ROUTE = "default"
DEFAULT_WEB_PORT = 8081  # INVOICE_RELAY_WEB_PORT: the status page; 0 turns it off
DEFAULT_WEB_USER = "accountant"  # INVOICE_RELAY_WEB_USER
DEFAULT_PAGE_ROWS = 50  # audit rows on one page of the status page
