"""The GetMyInvoices API (v3) without HTTP: what each answer means and what a request
carries, as shared/DESIGN.md "Delivering through the GetMyInvoices API" lays down.

Kept apart from `worker.delivery.getmyinvoices` (the httpx client, budgets and marks) so
that these decisions stay pure and are tested by tables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryRejected,
    DeliveryThrottled,
    DeliveryUnavailable,
    DestinationRefused,
)
from worker.mail.text import clean_text
from worker.models import DeliveryKind, Parcel

__all__ = [
    "ALREADY_THERE",
    "AMBIGUOUS_NUMBER",
    "APPLICATION",
    "VIA",
    "Account",
    "as_integer",
    "classify",
    "document_type",
    "header_seconds",
    "upload_request",
]

VIA = DeliveryKind.GETMYINVOICES.value
APPLICATION = "invoice-relay"  # the x-application header: the document's source
ALREADY_THERE = "already in GetMyInvoices"
# In the note of an upload without `documentNumber` although a number was read.
AMBIGUOUS_NUMBER = "no documentNumber: the first pages name several invoice numbers"

CREDIT_NOTE = "CREDIT_NOTE"

# How long a limit holds when the answer does not say. The description says neither
# which of the minute and day limits a 403/429 is nor when the hourly one resets: the
# shortest plausible wait is taken (a day limit then costs one call a minute).
MINUTE_LIMIT_SECONDS = 60.0
HOURLY_LIMIT_SECONDS = 3600.0
UNAVAILABLE_SECONDS = 300.0  # 503: "Please retry in a few minutes."

SESSION_CAUSES = {
    403: "the API key is unknown (check INVOICE_RELAY_GMI_API_KEY)",
    407: "the API key is blocked",
    430: "the API key lacks permission for documents",
    431: "the account is cancelled",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """What `GET /account` says."""

    account_id: str
    name: str

    @property
    def destination(self) -> str:
        """The budgets' key, shared by every route and replica with this account."""
        return f"{VIA}:{self.account_id}"


def classify(
    status: int, body: Mapping[str, Any], *, retry_after: float | None = None
) -> DeliveryRefused | DeliveryUnavailable | None:
    """What an answer other than a 200 means; None for 200 and for 422/127 (the
    document is there). `retry_after`: the HTTP Retry-After header, in seconds."""
    code = as_integer(body.get("error_code", body.get("code")))
    detail = clean_text(str(body.get("detail") or body.get("message") or ""), 300)
    words = f"HTTP {status}" + (f" code {code}" if code is not None else "")
    words += f": {detail}" if detail else ""
    if status == 200:
        return None
    if status == 422 and code == 127:
        return None
    if status == 422 and code == 105:
        return DeliveryThrottled(
            words,
            retry_after_seconds=HOURLY_LIMIT_SECONDS,
            limit="the API's hourly upload limit (100 uploads)",
            code=status,
        )
    if status == 403 and code == 429:
        return DeliveryThrottled(
            words,
            retry_after_seconds=MINUTE_LIMIT_SECONDS,
            limit="the API's minute or day call limit",
            code=status,
        )
    if status == 429:
        return DeliveryThrottled(
            words,
            retry_after_seconds=retry_after or MINUTE_LIMIT_SECONDS,
            limit="the API's rate limit (HTTP 429)",
            code=status,
        )
    if status == 503:
        return DeliveryThrottled(
            words,
            retry_after_seconds=retry_after or UNAVAILABLE_SECONDS,
            limit="the API's availability (HTTP 503)",
            code=status,
        )
    if status == 403 and code in SESSION_CAUSES:
        return DestinationRefused(f"GetMyInvoices: {SESSION_CAUSES[code]} ({words})", code=code)
    if status == 403:
        return DestinationRefused(f"GetMyInvoices refused the API key ({words})", code=code)
    if status == 422 and code == 100:
        return DeliveryDeferred(f"GetMyInvoices: an unexpected error ({words})", code=status)
    if 400 <= status < 500:
        error = f"error_code {code}" if code is not None else "no error_code"
        return DeliveryRejected(
            f"GetMyInvoices refused the document ({words}; {error})", code=status
        )
    return DeliveryDeferred(f"GetMyInvoices answered {words}", code=status)


def upload_request(
    parcel: Parcel, encoded: str, *, document_type: str, run_ocr: bool, tags: Sequence[str]
) -> dict[str, Any]:
    """The body of `POST /documents` for this parcel: `documentNumber` only when the
    invoice number was read unambiguously (the note says when it was not)."""
    request: dict[str, Any] = {
        "fileName": parcel.filename,
        "fileContent": encoded,
        "documentType": document_type,
        "note": _note(parcel),
        "runOCR": run_ocr,
    }
    if parcel.invoice_number and not parcel.invoice_number_ambiguous:
        request["documentNumber"] = parcel.invoice_number
    if tags:
        request["tags"] = list(tags)
    return request


def document_type(parcel: Parcel, *, pattern: re.Pattern[str] | None, default: str) -> str:
    """CREDIT_NOTE where `pattern` matched the first pages' text, the filename or
    the subject; else `default` (INVOICE_RELAY_GMI_DOCUMENT_TYPE)."""
    if parcel.credit_note:  # the first pages' text matched (the PDF check)
        return CREDIT_NOTE
    if pattern is not None and any(
        pattern.search(text) for text in (parcel.filename, parcel.original_subject)
    ):
        return CREDIT_NOTE
    return default


def _note(parcel: Parcel) -> str:
    date = parcel.original_date.isoformat() if parcel.original_date else "unknown"
    note = (
        f"Forwarded by invoice-relay. From: {parcel.original_sender or 'unknown'}; "
        f"Date: {date}; Message-ID: {parcel.original_message_id or 'none'}"
    )
    if parcel.invoice_number and parcel.invoice_number_ambiguous:
        note += f"; {AMBIGUOUS_NUMBER}"
    return note


def as_integer(value: object) -> int | None:
    """A JSON field that should be an integer (the API sends some as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def header_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds; None when absent or not a number."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
