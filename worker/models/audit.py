"""Values read back from the audit log: by the CLI, the failure notice and the status
page. Pure: no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from worker.models.defaults import DEFAULT_PAGE_ROWS, DEFAULT_ROUTE
from worker.models.documents import AttemptOutcome, DocumentState, Outcome


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A short plain-text mail to a person about the audit log (a failure notice)."""

    sender: str  # INVOICE_RELAY_FORWARD_FROM
    recipient: str  # INVOICE_RELAY_NOTIFY_TO
    subject: str
    body: str
    rows: int  # audit rows it covers, for the loop guard's marker header
    written_at: datetime  # its Date


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    since: datetime | None = None
    outcomes: tuple[Outcome, ...] = ()
    invoice_number: str | None = None
    limit: int | None = None
    route: str | None = None  # `audit --route NAME`


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentScope:
    """Which documents `retry` and `resend` mean when a SHA-256 is bound for several
    destinations: those a route introduced, or those bound for one destination."""

    route: str | None = None
    destination: str | None = None


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
    route: str = DEFAULT_ROUTE  # the route that recorded it
    destination: str | None = None  # its document's; None before destinations (all of them)


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
class DeliveryAttempt:
    """One try at delivering a document, as `delivery_attempts` keeps it."""

    attempted_at: datetime  # on the database's clock
    outcome: AttemptOutcome
    answer: str  # the destination's own words (cleaned by the adapter), or why not sent
    via: str  # "smtp" or "getmyinvoices" (`DeliveryKind`)


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
    forwarded_message_id: str | None = None  # the forwarded mail's Message-ID (SMTP only)
    delivered_via: str | None = None  # where it was delivered: "smtp" or "getmyinvoices"
    # the destination's id for it: the Message-ID, or GetMyInvoices' documentUid
    # ("" when the API had the document already)
    delivery_id: str | None = None
    resend_count: int = 0
    created_at: datetime | None = None
    pdf_kept: bool = False  # its bytes are still stored (KEEP_PDFS, or not sent yet)
    sightings: tuple[AuditRow, ...] = ()  # every sighting of the document, oldest first
    # its last tries (at most `KEPT_ATTEMPTS`), oldest first
    attempt_history: tuple[DeliveryAttempt, ...] = ()


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
