"""Values of the documents and their send queue: sightings recorded, documents claimed
for sending, what a destination receives and answers, and the outcome enums of the audit
log, and what a mail's sightings say when it is settled. Pure: no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from worker.models.mail import MailHeaders


class DeliveryKind(enum.Enum):
    """INVOICE_RELAY_DELIVERY, and `audit_log.delivered_via`."""

    SMTP = "smtp"  # mail to FORWARD_TO
    GETMYINVOICES = "getmyinvoices"  # the GetMyInvoices REST API (v3)


class DedupMode(enum.Enum):
    CONTENT = "content"  # a PDF is known when its bytes hash or its page fingerprint is known
    BYTES = "bytes"  # a PDF is known only when its SHA-256 is known


class DocumentState(enum.Enum):
    PENDING = "pending"  # accepted, waiting for its first send or a retry
    FORWARDED = "forwarded"  # the SMTP server accepted the forwarded mail
    FAILED = "failed"  # refused for good or out of attempts: a person must look


class AttemptOutcome(enum.Enum):
    """What one try at delivering a document came to (`delivery_attempts.outcome`)."""

    FORWARDED = "forwarded"  # the destination accepted it
    RETRY = "retry"  # refused for now: counted, tried again later
    FAILED = "failed"  # refused for good, or the last attempt allowed: counted, FAILED
    HELD = "held"  # a limit of the destination: due again later, not counted
    RELEASED = "released"  # the session could not take it: nothing sent, not counted


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
    invoice_number_ambiguous: bool = False  # the first pages read as several numbers
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
    invoice_number_ambiguous: bool = False  # its first pages read as several numbers
    credit_note: bool = False  # the introducing sighting's first pages read as one
    upload_started: bool = False  # an API upload of it may have gone out before
    # Where it goes; None for a document older than destinations (its Message-ID then
    # stays what it was, so a retry across the upgrade is still the same delivery).
    destination: str | None = None


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
    # The first pages read as several numbers: `invoice_number` is only the first.
    invoice_number_ambiguous: bool = False
    credit_note: bool = False  # its first pages' text matched the credit note pattern
    # An upload of it was started before and may have arrived: an API asks first.
    upload_started: bool = False
    destination: str | None = None  # the document's (`OutgoingDocument.destination`)

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
            invoice_number_ambiguous=document.invoice_number_ambiguous,
            credit_note=document.credit_note,
            upload_started=document.upload_started,
            destination=document.destination,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What a destination said when it accepted a parcel."""

    delivery_id: str  # the destination's id for it: the Message-ID by SMTP
    answer: str  # the destination's own words, e.g. "250 2.0.0 queued as 4F2A"
    # `audit_log.delivered_via`: "smtp" or "getmyinvoices". With the API, delivery_id
    # is the documentUid, or "" when GetMyInvoices had the document already.
    via: str = "smtp"


# --- settling a mail: what its sightings say (INVOICE_RELAY_AFTER_FORWARD) ------------


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
