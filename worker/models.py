"""Value objects and outcome enums shared by every module. Pure: no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from worker.tokens import TokenCredentials

# --- defaults: one home for each ------------------------------------------------------
# The settings give them to a user who sets nothing (README, "Configuration"); the value
# objects of the relay and the adapters use the same ones when built without settings
# (tests, bench, tools), so a test's "default" is the user's default.

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


class DeliveryKind(enum.Enum):
    """INVOICE_RELAY_DELIVERY, and `audit_log.delivered_via`."""

    SMTP = "smtp"  # mail to FORWARD_TO
    GETMYINVOICES = "getmyinvoices"  # the GetMyInvoices REST API (v3)


class Security(enum.Enum):
    SSL = "ssl"  # TLS from the first byte (IMAPS 993, SMTPS 465)
    STARTTLS = "starttls"  # plain connect, then upgrade before login
    NONE = "none"  # no TLS at all: loopback and tests only


class DedupMode(enum.Enum):
    CONTENT = "content"  # a PDF is known when its bytes hash or its page fingerprint is known
    BYTES = "bytes"  # a PDF is known only when its SHA-256 is known


class DocumentState(enum.Enum):
    PENDING = "pending"  # accepted, waiting for its first send or a retry
    FORWARDED = "forwarded"  # the SMTP server accepted the forwarded mail
    FAILED = "failed"  # refused for good or out of attempts: a person must look


class SightingKind(enum.Enum):
    DOCUMENT = "document"  # this sighting introduced a new document
    DUPLICATE = "duplicate"  # an accepted PDF whose document was already known
    REJECTED = "rejected"  # not accepted, by a rule; reason says which
    ERROR = "error"  # something unexpected; retried on later polls
    NO_PDF = "no_pdf"  # the mail carried no PDF candidate at all


class ReasonCode(enum.Enum):
    """A stable code beside a sighting's reason, for the code that must tell reasons apart:
    the reason text is for people and may be reworded."""

    NOTICE_LOOP = "notice_loop"  # our own failure notice come back to the polled mailbox
    VANISHED = "vanished"  # listed by SEARCH, gone by FETCH: expunged or moved meanwhile


class Outcome(enum.Enum):
    """What `audit_log.outcome` shows for one sighting."""

    FORWARDED = "forwarded"  # introduced a document that was forwarded
    PENDING = "pending"  # introduced a document that waits for a send or retry
    FAILED = "failed"  # introduced a document that was refused for good
    DUPLICATE = "duplicate"  # the same invoice was already known
    REJECTED = "rejected"  # not accepted by a rule
    ERROR = "error"  # unexpected failure; retried later
    NO_PDF = "no_pdf"  # the mail carried no PDF


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderStatus:
    """What SELECT/EXAMINE tells about the polled folder."""

    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyPart:
    """One node of a mail's MIME tree, as the IMAP server's BODYSTRUCTURE describes it.

    `section` is the IMAP part specifier ("1", "2.1", ...); the root of a multipart
    mail has section "" (it cannot be fetched as a part).
    """

    section: str
    content_type: str  # lower case "type/subtype"
    params: Mapping[str, str] = field(default_factory=dict)  # keys lower case, values raw
    disposition: str | None = None  # lower case "attachment" / "inline"
    disposition_params: Mapping[str, str] = field(default_factory=dict)
    encoding: str = "7bit"  # lower case Content-Transfer-Encoding
    size: int = 0  # encoded size in octets
    children: tuple[BodyPart, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A part that is, or may be, a PDF.

    `certain` is True when the label says PDF (name ends in .pdf or type is
    application/pdf); otherwise the first bytes must be probed for `%PDF-`.
    """

    section: str
    filename: str | None
    content_type: str
    encoding: str
    size: int
    certain: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MailHeaders:
    """The few headers of an incoming mail the relay reads; text already decoded."""

    message_id: str = ""
    sender: str = ""  # the From header as display text
    sender_address: str = ""  # the single address in From, lower case; "" when unparseable
    sender_defect: str | None = None  # why From could not be trusted, when it cannot
    subject: str = ""
    date: datetime | None = None
    auto_submitted: str | None = None
    relay_marker: str | None = None  # our own X-Invoice-Relay header, when present
    notice_marker: str | None = None  # our X-Invoice-Relay-Notice header (failure notices)
    authentication_results: tuple[str, ...] = ()  # raw values, top (newest) first


@dataclass(frozen=True, slots=True, kw_only=True)
class MailSummary:
    """What one FETCH of BODYSTRUCTURE, size, internal date and headers yields for a mail."""

    uid: int
    size: int
    internaldate: datetime | None
    headers: MailHeaders
    structure: BodyPart | None  # None when the server could not describe it
    structure_problem: str | None = None  # why the structure could not be read


@dataclass(frozen=True, slots=True, kw_only=True)
class PdfReport:
    """What inspecting one file found. `accepted` False means `reason` says why not."""

    accepted: bool
    reason: str | None = None
    encrypted: bool = False
    pages: int = 0
    fingerprint: str | None = None  # "fp1:<hex>" or None when it could not be computed
    fingerprint_note: str | None = None  # why there is no fingerprint
    invoice_number: str | None = None
    # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN matched the first pages' text (when checked).
    credit_note: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxPosition:
    """How far the relay got in one mailbox: every UID <= last_uid is recorded."""

    mailbox: str
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartRecord:
    """One sighting to record: a PDF candidate of a mail, or the mail's `no_pdf` row.

    `kind` is what the pipeline decided *before* the store looked for duplicates:
    DOCUMENT for an accepted PDF (the store turns it into DUPLICATE when a key is
    already known), REJECTED, ERROR or NO_PDF. `part` is the MIME section, "" for NO_PDF.
    """

    part: str
    kind: SightingKind
    reason: str | None = None
    reason_code: ReasonCode | None = None  # for the reasons that code tells apart
    filename: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    fingerprint: str | None = None
    invoice_number: str | None = None
    credit_note: bool = False  # its first pages read as a credit note
    content: bytes | None = None  # the PDF's bytes, for DOCUMENT only


@dataclass(frozen=True, slots=True, kw_only=True)
class MailRecord:
    """Everything recorded about one incoming mail in one poll."""

    uid: int
    headers: MailHeaders
    parts: tuple[PartRecord, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedSighting:
    """What the store made of one PartRecord."""

    sighting_id: int
    uid: int
    part: str
    kind: SightingKind  # DOCUMENT only when this sighting introduced a new document
    reason: str | None
    document_id: int | None
    duplicate_of: int | None  # the introducing sighting's id, for a duplicate
    inserted: bool  # False when the sighting existed already (rescan, crash replay)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingDocument:
    """A pending document claimed (leased) for sending, with what the forwarded mail needs."""

    document_id: int
    sha256: str
    content: bytes
    filename: str
    attempts: int
    resend_count: int
    original_sender: str
    original_subject: str
    original_date: datetime | None
    original_message_id: str
    invoice_number: str | None = None  # the introducing sighting's
    credit_note: bool = False  # the introducing sighting's first pages read as one
    upload_started: bool = False  # an API upload of it may have gone out before


@dataclass(frozen=True, slots=True, kw_only=True)
class Parcel:
    """One PDF to deliver, with what any destination needs to describe it.

    Nothing of the send queue (lease, attempts): a destination sees the document, not
    how often it was tried. `resend_count` is the document's: a deliberate resend is a
    new delivery (a new Message-ID), a retry is the same one.
    """

    sha256: str
    content: bytes
    filename: str
    resend_count: int
    original_sender: str
    original_subject: str
    original_date: datetime | None
    original_message_id: str
    invoice_number: str | None = None  # as read from the PDF, when it was
    credit_note: bool = False  # its first pages' text matched the credit note pattern
    # An upload of it was started before and may have arrived: an API asks first.
    upload_started: bool = False

    @classmethod
    def from_outgoing(cls, document: OutgoingDocument) -> Parcel:
        return cls(
            sha256=document.sha256,
            content=document.content,
            filename=document.filename,
            resend_count=document.resend_count,
            original_sender=document.original_sender,
            original_subject=document.original_subject,
            original_date=document.original_date,
            original_message_id=document.original_message_id,
            invoice_number=document.invoice_number,
            credit_note=document.credit_note,
            upload_started=document.upload_started,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What a destination said when it accepted a parcel."""

    delivery_id: str  # the destination's id for it: the Message-ID by SMTP
    answer: str  # the destination's own words, e.g. "250 2.0.0 queued as 4F2A"
    # `audit_log.delivered_via`: "smtp" or "getmyinvoices". With the API, delivery_id
    # is the documentUid, or "" when GetMyInvoices had the document already.
    via: str = "smtp"


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A short plain-text mail to a person about the audit log (a failure notice)."""

    sender: str  # INVOICE_RELAY_FORWARD_FROM
    recipient: str  # INVOICE_RELAY_NOTIFY_TO
    subject: str
    body: str
    rows: int  # audit rows it covers, for the loop guard's marker header
    written_at: datetime  # its Date


class SecretText(Protocol):
    """A secret string that prints masked (`worker.config.settings.Secret`)."""

    def reveal(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordCredentials:
    """A user name and password, for IMAP LOGIN / AUTHENTICATE PLAIN and SMTP AUTH."""

    user: str
    password: SecretText

    def __repr__(self) -> str:
        return f"PasswordCredentials(user={self.user!r}, password='****')"


# What an adapter logs in with: a password, or an OAuth2 token source (SASL XOAUTH2 /
# OAUTHBEARER, worker.mail.sasl). Each adapter's `match` says how it carries each kind.
Credentials = PasswordCredentials | TokenCredentials


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    since: datetime | None = None
    outcomes: tuple[Outcome, ...] = ()
    invoice_number: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRow:
    """One row of the `audit_log` view."""

    id: int
    received_at: datetime
    mail_date: datetime | None
    mailbox: str
    uidvalidity: int
    uid: int
    message_id: str
    sender: str
    subject: str
    filename: str | None
    size_bytes: int | None
    sha256: str | None
    fingerprint: str | None
    invoice_number: str | None
    outcome: Outcome
    reason: str | None
    duplicate_of: int | None
    forwarded_at: datetime | None
    forwarded_message_id: str | None
    attempts: int | None
    mail_action: str | None = None  # what was done to the mail after forwarding (settled)
    delivered_via: str | None = None  # "smtp" or "getmyinvoices", once delivered
    delivery_id: str | None = None  # Message-ID or documentUid; "" when GMI had it


@dataclass(frozen=True, slots=True, kw_only=True)
class PollReport:
    """What one poll did; the CLI prints it, the service turns it into metrics."""

    mailbox: str
    started_at: datetime
    finished_at: datetime
    mails_seen: int = 0
    sightings: Mapping[Outcome, int] = field(default_factory=dict)  # new sightings by outcome
    forwarded: int = 0
    retried_later: int = 0  # temporary refusals this poll
    failed: int = 0  # documents that became failed this poll
    pending: int = 0  # documents still pending after the poll
    failed_total: int = 0  # documents in the failed state after the poll
    rescanned: bool = False  # UIDVALIDITY changed, the folder was read again
    locked: bool = False  # another replica held the mailbox's poll lock; nothing was done
    mail_actions: int = 0  # settled mails marked, flagged or moved this poll
    mail_action_problem: str | None = None  # why INVOICE_RELAY_AFTER_FORWARD could not act

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


# How long a statement waits for another writer: SQLite's busy_timeout, set by the store
# (`worker.store.engine`); the send lease (`worker.relay.retry.lease_seconds`) allows for
# recording one send's outcome queueing that long.
DATABASE_WAIT_SECONDS = 30.0


class ProblemKind(enum.Enum):
    FAILED = "failed"  # a document refused for good or out of attempts: it was not forwarded
    REJECTED = "rejected"  # a sighting refused by a rule (not a PDF, stranger, too large, ...)
    ERROR = "error"  # a sighting whose check crashed or timed out; retried on later polls


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One audit_log row a person should look at (in a failure notice)."""

    audit_id: int  # the audit_log row's id (the sighting)
    kind: ProblemKind
    reason: str
    filename: str | None = None
    document_id: int | None = None  # for FAILED: the document that was not forwarded


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeMark:
    """The latest failure notice: when it went out and how far its sightings reached."""

    sent_at: datetime
    last_sighting_id: int


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


# --- after forwarding: what happens to the mail (INVOICE_RELAY_AFTER_FORWARD) ----------


class MailActionMode(enum.Enum):
    KEEP = "keep"  # the folder is only EXAMINEd: nothing about the mail changes
    SEEN = "seen"  # a settled mail gets the \\Seen flag
    FLAG = "flag"  # a settled mail gets the \\Flagged flag
    MOVE = "move"  # a settled mail is moved to another folder


@dataclass(frozen=True, slots=True, kw_only=True)
class AfterForward:
    """What to do with a settled mail that carried an accepted PDF."""

    mode: MailActionMode = MailActionMode.KEEP
    folder: str | None = None  # the target of MOVE; set exactly then

    def __post_init__(self) -> None:
        if (self.mode is MailActionMode.MOVE) != bool(self.folder):
            raise ValueError("a folder is needed for move, and only for move")

    def __str__(self) -> str:
        """The setting's own spelling: `keep`, `seen`, `flag` or `move:FOLDER`."""
        if self.mode is MailActionMode.MOVE:
            return f"move:{self.folder}"
        return str(self.mode.value)

    @property
    def changes_mailbox(self) -> bool:
        return self.mode is not MailActionMode.KEEP

    @property
    def done_text(self) -> str:
        """What `audit_log.mail_action` says once the action was taken."""
        if self.mode is MailActionMode.MOVE:
            return f"moved to {self.folder}"
        return {MailActionMode.SEEN: "seen", MailActionMode.FLAG: "flagged"}.get(self.mode, "")


@dataclass(frozen=True, slots=True, kw_only=True)
class PartState:
    """One sighting of a mail, as far as settling the mail is concerned."""

    kind: SightingKind
    document_state: DocumentState | None  # of the document introduced or duplicated


@dataclass(frozen=True, slots=True, kw_only=True)
class UntidiedMail:
    """A mail with a forwarded document whose after-forward action is not recorded yet."""

    uid: int
    message_id: str
    parts: tuple[PartState, ...]
    copy_started: bool = False  # a COPY/MOVE may have gone out before a crash


# --- the status page: what it reads -----------------------------------------------------

# Every row's route until the routes file (shared/DESIGN.md, "Several mailboxes and
# destinations") gives rows routes of their own.
DEFAULT_ROUTE = "default"
DEFAULT_WEB_PORT = 8081  # INVOICE_RELAY_WEB_PORT: the status page; 0 turns it off
DEFAULT_WEB_USER = "accountant"  # INVOICE_RELAY_WEB_USER
DEFAULT_PAGE_ROWS = 50  # audit rows on one page of the status page


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteScope:
    """The routes one web user sees and acts on; `routes` None means every route.

    One value handed to every query of the status page, so that scoping is one filter
    applied everywhere (rows, counts, a document by its URL, links, CSV, actions)."""

    routes: frozenset[str] | None = None

    @classmethod
    def everything(cls) -> RouteScope:
        return cls(routes=None)

    @classmethod
    def of(cls, names: Iterable[str]) -> RouteScope:
        """`["*"]` (or a list holding it) is every route, as in `[[web_users]]`."""
        wanted = frozenset(names)
        return cls.everything() if "*" in wanted else cls(routes=wanted)

    def allows(self, route: str) -> bool:
        return self.routes is None or route in self.routes


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSearch:
    """One page of the audit log as the status page asks for it; text fields match
    case-insensitively anywhere in the value, except the invoice number (exact)."""

    scope: RouteScope
    invoice_number: str | None = None
    sender: str | None = None
    filename: str | None = None
    outcomes: tuple[Outcome, ...] = ()
    route: str | None = None
    received_from: datetime | None = None  # inclusive
    received_before: datetime | None = None  # exclusive
    offset: int = 0
    limit: int | None = DEFAULT_PAGE_ROWS  # None: every matching row (the CSV export)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditPage:
    rows: tuple[AuditRow, ...]
    total: int  # rows matching the search, all pages together


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuedDocument:
    """A document that waits (pending) or failed, for the overview."""

    sighting_id: int  # the sighting that introduced it: its page on the status page
    filename: str | None
    invoice_number: str | None
    attempts: int
    next_attempt_at: datetime
    last_answer: str | None  # the server's last answer: why it waits or failed


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteOverview:
    route: str
    mailboxes: tuple[str, ...]  # the folders this route polls
    position_moved_at: datetime | None  # when a poll last moved a mailbox's position
    waiting: tuple[QueuedDocument, ...]
    failed: tuple[QueuedDocument, ...]
    today: Mapping[Outcome, int]  # sightings received since midnight UTC, by outcome
    month: Mapping[Outcome, int]  # since the first of the month (UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentStory:
    """One audit row and, when it belongs to a document, that document's life."""

    row: AuditRow  # the sighting asked for
    route: str
    document_id: int | None
    state: DocumentState | None
    attempts: int = 0
    last_answer: str | None = None
    next_attempt_at: datetime | None = None
    forwarded_at: datetime | None = None
    forwarded_message_id: str | None = None  # the delivery id the destination answered
    resend_count: int = 0
    created_at: datetime | None = None
    pdf_kept: bool = False  # its bytes are still stored (KEEP_PDFS, or not sent yet)
    sightings: tuple[AuditRow, ...] = ()  # every sighting of the document, oldest first


@dataclass(frozen=True, slots=True, kw_only=True)
class PollStatus:
    """What the running service knows of its polls (the status page's overview)."""

    last_finished_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    next_poll_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSession:
    """A signed-in browser, as the database keeps it (logout deletes the row)."""

    user: str
    csrf_token: str
    created_at: datetime
    last_seen_at: datetime
