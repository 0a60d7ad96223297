"""Pure verdicts on one mail or one part: who may send, what is a loop, what a PDF
check's report means for the audit row. No I/O; table-tested."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from worker.errors import PdfCheckFailed
from worker.mail.text import clean_text
from worker.models import Candidate, MailSummary, PartRecord, PdfReport, ReasonCode, SightingKind

DESCRIBE_MAX_CHARS = 500  # an exception's text in an audit row's reason


def sender_allowed(address: str, allowed: Sequence[str]) -> bool:
    """Whether `address` matches the allowlist (empty allowlist: anyone)."""
    if not allowed:
        return True
    if not address:
        return False
    domain = "@" + address.rpartition("@")[2]
    return address in allowed or domain in allowed


# Our own failure notice (worker.relay.notify) come back; notices leave these rows out (by
# their ReasonCode.NOTICE_LOOP), or a notice sent to the polled mailbox would cause the next one.
NOTICE_LOOP_REASON = "loop: an invoice-relay failure notice (X-Invoice-Relay-Notice)"

# A UID that SEARCH listed and FETCH no longer described: someone expunged or moved the
# mail in between. IMAP never gives an expunged UID to another mail (RFC 3501 2.3.1.1),
# and a mail moved back gets a new UID, read as new mail: so the row is final (rejected,
# never retried), and notices leave it out by its ReasonCode.VANISHED (a person removed
# the mail on purpose).
VANISHED_REASON = "vanished before fetch"


def vanished_part() -> PartRecord:
    """The one row of a mail that vanished between SEARCH and FETCH."""
    return PartRecord(
        part="",
        kind=SightingKind.REJECTED,
        reason=VANISHED_REASON,
        reason_code=ReasonCode.VANISHED,
    )


def is_vanished(parts: Sequence[PartRecord]) -> bool:
    return any(part.reason_code is ReasonCode.VANISHED for part in parts)


def loop_reason(summary: MailSummary, forward_from: str) -> str | None:
    """Why this mail is our own forwarded mail (or failure notice) coming back, or None."""
    headers = summary.headers
    if headers.notice_marker is not None:
        return NOTICE_LOOP_REASON
    if headers.relay_marker is not None:
        return "loop: carries the X-Invoice-Relay header of a forwarded mail"
    auto = (headers.auto_submitted or "").strip().lower()
    if auto and auto != "no" and headers.sender_address == forward_from.lower():
        return "loop: Auto-Submitted mail from INVOICE_RELAY_FORWARD_FROM"
    return None


def loop_code(summary: MailSummary) -> ReasonCode | None:
    """The code stored beside `loop_reason`'s text where code must tell that loop apart."""
    return ReasonCode.NOTICE_LOOP if summary.headers.notice_marker is not None else None


def estimated_decoded_size(candidate: Candidate) -> int:
    if candidate.encoding == "base64":
        return candidate.size * 3 // 4
    return candidate.size


def checked_part(
    section: str, filename: str, data: bytes, report: PdfReport | Exception
) -> PartRecord:
    sha256 = hashlib.sha256(data).hexdigest()
    reason: str | None
    if isinstance(report, Exception):
        reason = (
            f"PDF check failed: {report}"
            if isinstance(report, PdfCheckFailed)
            else describe(report)
        )
        kind = SightingKind.ERROR
    elif not report.accepted:
        kind, reason = SightingKind.REJECTED, report.reason
    else:
        return PartRecord(
            part=section,
            kind=SightingKind.DOCUMENT,
            reason=report.fingerprint_note,
            filename=filename,
            size_bytes=len(data),
            sha256=sha256,
            fingerprint=report.fingerprint,
            invoice_number=report.invoice_number,
            invoice_number_ambiguous=report.invoice_number_ambiguous,
            credit_note=report.credit_note,
            content=data,
        )
    return PartRecord(
        part=section,
        kind=kind,
        reason=reason,
        filename=filename,
        size_bytes=len(data),
        sha256=sha256,
    )


def too_large(candidate: Candidate, limit: int) -> PartRecord:
    return PartRecord(
        part=candidate.section,
        kind=SightingKind.REJECTED,
        reason=f"PDF too large: about {estimated_decoded_size(candidate)} bytes, limit {limit}"
        " (INVOICE_RELAY_MAX_PDF_BYTES)",
        filename=candidate.filename,
        size_bytes=estimated_decoded_size(candidate),
    )


def describe(exc: BaseException) -> str:
    """One line naming the exception, for an audit row's reason."""
    text = clean_text(str(exc), DESCRIBE_MAX_CHARS)
    return (
        clean_text(f"{type(exc).__name__}: {text}", DESCRIBE_MAX_CHARS)
        if text
        else type(exc).__name__
    )


def section_key(section: str) -> tuple[int, ...]:
    return tuple(int(piece) for piece in section.split(".") if piece.isdigit())
