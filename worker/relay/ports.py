"""The small Protocols through which the pipeline sees the outside world.

Adapters (`worker.imap.mailbox`, `worker.delivery.smtp`, `worker.store.sqlstore.SqlStore`,
`worker.pdf.pool`) implement them; `tests/fakes.py` has in-memory fakes for unit tests.
The store is seen through one Protocol per consumer: the poll (`PollStore`), the send
loop (`SendQueue`), the audit log (`AuditReader`) and the admin commands (`AdminStore`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Protocol

from worker.models import (
    AuditFilter,
    AuditPage,
    AuditRow,
    AuditSearch,
    DedupMode,
    DocumentState,
    DocumentStory,
    FolderStatus,
    MailboxPosition,
    MailRecord,
    MailSummary,
    OutgoingDocument,
    Parcel,
    PdfReport,
    Receipt,
    RecordedSighting,
    RouteOverview,
    RouteScope,
    UntidiedMail,
    WebSession,
)


class Mailbox(Protocol):
    """One IMAP folder, opened read-only. Raises `worker.errors.MailboxError`."""

    def open(self) -> FolderStatus:
        """Connect, log in and EXAMINE the folder (read-only). An OAuth2 login whose
        token cannot be had raises `worker.errors.TokenEndpointError`."""

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        """UIDs greater than `after_uid` (received on or after `since`), ascending."""

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        """BODYSTRUCTURE, RFC822.SIZE, INTERNALDATE and a few headers; vanished UIDs are absent."""

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        """Raw (still transfer-encoded) bytes of the given sections, BODY.PEEK, batched.

        With `max_bytes`, only the first `max_bytes` octets of each section (a probe).
        Sections the server does not return are absent from the result.
        """

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Whole raw mails (BODY.PEEK[]), batched; for DKIM. The caller bounds the sizes.
        Mails the server does not return are absent from the result."""

    def close(self) -> None:
        """Log out; never raises."""


class Destination(Protocol):
    """One session with where documents go (SMTP today; an HTTP API later).

    Raises `worker.errors.DeliveryUnavailable` for the session, or a
    `worker.errors.DeliveryRefused` subclass for one document.
    """

    def open(self) -> None:
        """Connect and log in. Raises `DeliveryUnavailable`, or `TokenEndpointError`
        when an OAuth2 login's token cannot be had (nothing was sent either way)."""

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        """Deliver one document; the receipt names the destination's id for it.

        Raises `DeliveryUnavailable` when the session cannot take any document (nothing
        of this one was delivered), else `DeliveryDeferred` (try later),
        `DeliveryRejected` (never) or `DeliveryUncertain` (it may have arrived).

        `before_final` runs once, after the document went out and before the step that
        lets the destination accept it; whatever it raises abandons the document (the
        session is dropped, the destination keeps nothing) and propagates.

        `more_follows`: the caller will deliver another document next, in this session.
        The destination may then begin that one (anything short of what makes it final,
        which still waits for that call's `before_final`) while it awaits this one's
        answer, so that a session costs about one exchange per document. A session
        closed instead, or a refusal, drops what was begun."""

    def close(self) -> None:
        """End the session; never raises."""


class Inspector(Protocol):
    """Validates PDFs and computes fingerprints, isolated from the poll's process."""

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        """One report per file, in order; a check that crashed or timed out yields
        a `worker.errors.PdfCheckFailed` in its place instead of raising."""

    def close(self) -> None:
        """Stop worker processes."""


class PollStore(Protocol):
    """What a poll needs: its position in the mailbox, the recording of what it read, and
    the ERROR sightings it retries or gives up on. Raises `worker.errors.StoreError`; the
    database decides uniqueness."""

    def position(self, mailbox: str) -> MailboxPosition | None:
        """How far polling got in `mailbox`, or None before the first poll."""

    def reset_position(self, mailbox: str, uidvalidity: int, *, owner: str) -> None:
        """Start over at UID 0 under a new UIDVALIDITY (a rescan). Raises `LeaseLost`
        (and changes nothing) unless `owner` holds the poll lease of `mailbox`."""

    def record_mails(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        mails: Sequence[MailRecord],
        advance_to: int | None,
        dedup: DedupMode,
        keep_pdfs: bool,
        now: datetime,
        owner: str,
        destination: str,
        route: str = ...,
    ) -> list[RecordedSighting]:
        """In one transaction, only while `owner` holds the poll lease of `mailbox`
        (else `LeaseLost`, and nothing is recorded): insert every sighting, marked with
        `route` (one that exists already is left alone, except an ERROR one, which is
        replaced), claim a document of `destination` for each accepted PDF by INSERT (a
        conflict on sha256, or on the fingerprint in content mode, with a document of
        that destination or one older than destinations makes the sighting a DUPLICATE
        whose reason names the key), then move the position of `mailbox` to
        `advance_to` (never backwards)."""

    def error_uids(self, *, mailbox: str, uidvalidity: int, max_tries: int) -> list[int]:
        """UIDs with ERROR sightings tried fewer than `max_tries` times."""

    def abandon_errors(
        self, *, mailbox: str, uidvalidity: int, uids: Sequence[int] | None, reason: str
    ) -> int:
        """ERROR sightings of these UIDs (None: all under `uidvalidity`) that can never be
        read again become REJECTED with `reason`; returns how many."""

    def reject_exhausted_errors(self, *, mailbox: str, max_tries: int) -> int:
        """ERROR sightings tried `max_tries` times become REJECTED; returns how many."""

    def known_key(self, *, sha256: str, content_key: str | None, destination: str) -> str | None:
        """Read-only, for a dry run: which key of a PDF `destination` knows already, or
        None."""


class SendQueue(Protocol):
    """What the send loop needs: documents due for sending, and the mark of each attempt.
    Raises `worker.errors.StoreError`."""

    def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_seconds: float, mailbox: str
    ) -> list[OutgoingDocument]:
        """Lease up to `limit` pending documents to `owner` for `lease_seconds` on the
        database's clock: those `mailbox` introduced (a document is delivered by the
        route whose mail introduced it) whose next attempt is due (by `now`) and whose
        lease, if any, has expired (FOR UPDATE SKIP LOCKED on PostgreSQL)."""

    # Every write under a document's lease names its owner and ends the lease; it raises
    # `worker.errors.LeaseLost`, changing nothing, when the lease expired or another
    # owner holds it now (fencing). Each mark also keeps the try as one attempt of the
    # document's history (`DocumentStory.attempt_history`), with its answer and `via`
    # (the destination's `DeliveryKind` value), in the same transaction.

    def mark_forwarded(
        self,
        document_id: int,
        *,
        owner: str,
        message_id: str,
        answer: str,
        now: datetime,
        keep_pdf: bool,
        via: str = "smtp",
    ) -> None:
        """`message_id` is the receipt's delivery id; `via` the receipt's."""

    def mark_retry(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        failed: bool,
        via: str = "smtp",
    ) -> None:
        """Count an attempt; `failed` True makes the document FAILED (out of attempts)."""

    def mark_failed(self, document_id: int, *, owner: str, answer: str, via: str = "smtp") -> None:
        """A permanent refusal: counts the attempt and makes the document FAILED."""

    def release(
        self, document_id: int, *, owner: str, answer: str | None = None, via: str = "smtp"
    ) -> None:
        """Drop the lease without counting an attempt (the session was refused, or the
        document was claimed and not begun). With `answer`, the document was the one in
        hand when the session failed: kept in its history as `released`."""

    def postpone(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        via: str = "smtp",
    ) -> None:
        """Drop the lease without counting an attempt, due again at `next_attempt_at`
        (a limit of the destination; `answer` says which)."""

    def still_holds(self, document_id: int, *, owner: str, lease_seconds: float) -> bool:
        """Whether `owner` still holds this document's lease (renewed when it does):
        asked before a mail's content is ended."""


class Leases(Protocol):
    """What the heartbeat and the way out need: every lease of one owner, documents and
    poll leases alike. Raises `worker.errors.StoreError`."""

    def renew(self, owner: str, *, lease_seconds: float) -> int:
        """Extend every unexpired lease `owner` holds, documents and poll leases; an
        expired one stays lost. Returns how many."""

    def release_all(self, owner: str) -> int:
        """Every lease `owner` holds, free at once (on the way out); returns how many
        documents."""


class AuditReader(Protocol):
    """What the audit log and the poll report read. Raises `worker.errors.StoreError`."""

    def audit(self, query: AuditFilter) -> list[AuditRow]: ...

    def state_counts(self, mailbox: str | None = ...) -> dict[DocumentState, int]:
        """Documents by state: all, or those `mailbox` introduced."""


class AdminStore(Protocol):
    """What the admin commands (`requeue`, `resend`) change. Raises `worker.errors.StoreError`."""

    def requeue(
        self,
        *,
        sha256: str | None,
        now: datetime,
        route: str | None = ...,
        destination: str | None = ...,
    ) -> int:
        """FAILED documents (one, or all; of one route or destination) back to PENDING;
        returns how many. Raises `worker.errors.DestinationAmbiguous` for a SHA-256 that
        documents of several destinations share when neither filter is given."""

    def resend(
        self,
        *,
        sha256: str,
        now: datetime,
        route: str | None = ...,
        destination: str | None = ...,
    ) -> bool:
        """Queue a forwarded document again on purpose (needs its kept bytes); raises
        `DestinationAmbiguous` as `requeue` does."""


class PipelineStore(PollStore, SendQueue, AuditReader, Protocol):
    """What a `Pipeline` is given: its poll's store, the send queue it hands to its
    `Forwarder`, and the state counts of its report."""


class MailActions(Protocol):
    """The polled folder, SELECTed (read-write) to act on settled mail after forwarding
    (INVOICE_RELAY_AFTER_FORWARD). Only used when the setting is not `keep`.
    Raises `worker.errors.MailboxError`."""

    def open_for_actions(self) -> FolderStatus:
        """Connect, log in and SELECT the folder (read-write)."""

    def capabilities(self) -> frozenset[str]:
        """The server's capabilities after login, upper case."""

    def folder_exists(self, folder: str) -> bool: ...

    def present_uids(self, uids: Sequence[int]) -> set[int]:
        """Which of these UIDs are still in the folder (UID SEARCH)."""

    def add_flag(self, uids: Sequence[int], flag: str) -> None:
        """UID STORE +FLAGS.SILENT (`flag`), e.g. `\\Seen`; idempotent."""

    def move(self, uid: int, folder: str) -> None:
        """UID MOVE (RFC 6851) of one mail."""

    def copy(self, uid: int, folder: str) -> None:
        """UID COPY of one mail; the caller expunges it after recording the copy."""

    def expunge_uid(self, uid: int) -> None:
        """`\\Deleted` and UID EXPUNGE (UIDPLUS) of this UID only; never a plain EXPUNGE."""

    def folder_holds(self, folder: str, message_id: str) -> bool:
        """Whether `folder` holds a mail with this Message-ID; the polled folder is
        SELECTed again afterwards."""

    def close(self) -> None:
        """Log out; never raises."""


class MailActionStore(Protocol):
    """What the after-forward step records. Raises `worker.errors.StoreError`."""

    def untidied_mails(self, *, mailbox: str, uidvalidity: int, limit: int) -> list[UntidiedMail]:
        """Mails with a forwarded document whose action is neither done nor skipped."""

    def start_copy(self, *, mailbox: str, uidvalidity: int, uid: int, now: datetime) -> None:
        """Recorded before a COPY or MOVE goes out."""

    def record_mail_actions(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        uids: Sequence[int],
        action: str | None,
        note: str | None = None,
        now: datetime,
    ) -> None:
        """`action` taken (the audit's text), or None: the mail was skipped for `note`."""


class PageReader(Protocol):
    """What the status page reads, always within a user's `RouteScope`: a row outside it
    does not exist for that user. Raises `worker.errors.StoreError`."""

    def search_audit(self, search: AuditSearch) -> AuditPage:
        """Rows of the `audit_log` view, newest first; `duplicate_of` is None when the
        row it names lies outside the scope."""

    def document_story(self, sighting_id: int, scope: RouteScope) -> DocumentStory | None:
        """None when there is no such sighting, or it lies outside the scope."""

    def route_overviews(self, scope: RouteScope, now: datetime) -> list[RouteOverview]: ...

    def document_pdf(self, sighting_id: int, scope: RouteScope) -> tuple[str, bytes] | None:
        """The kept PDF (filename, bytes) of this sighting's document, or None."""


class WebSessionStore(Protocol):
    """Server-side sessions of the status page: the signed cookie names a row here, so a
    logout (or an idle timeout) ends a session for good. Raises `worker.errors.StoreError`."""

    def start_session(
        self, *, token_hash: str, user: str, csrf_token: str, now: datetime
    ) -> None: ...

    def live_session(
        self, *, token_hash: str, now: datetime, idle_seconds: float
    ) -> WebSession | None:
        """The session if it was seen within `idle_seconds` (and marks it seen now);
        an expired one is deleted and None returned."""

    def end_session(self, *, token_hash: str) -> None: ...
