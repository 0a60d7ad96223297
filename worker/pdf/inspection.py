"""Validation, content fingerprint and invoice number of one PDF.

`inspect_pdf` decides everything about one file; `worker.pdf.pool.PdfInspector` runs it
in guarded worker processes, so a hostile PDF can neither hang nor crash a poll.

A PDF is accepted when it
- starts with `%PDF-` (after optional whitespace) and ends with `%%EOF` within its last
  1024 bytes (where readers look for it; a file without it was cut short),
- opens with pypdf, has a catalog and at least one page,
- and every page's content stream, and every image or form the page draws, decodes
  (a compressed stream that zlib reports as corrupt counts as not decoding).
The fingerprint (`worker.pdf.fingerprint`) is computed by the same walk that decodes
every stream; without one `fingerprint_note` says why, and the store keys the file by
its bytes hash.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import time
from typing import Final

from pypdf import PasswordType, PdfReader, apply_configuration
from pypdf.errors import DependencyError
from pypdf.generic import (
    DictionaryObject,
    NullObject,
)

from worker.mail.text import clean_text
from worker.models import PdfReport
from worker.pdf.content import (
    READ_ERRORS,
    Unparseable,
    our_bug,
    short,
)
from worker.pdf.fingerprint import (
    PYPDF_LIMITS,
    TEXT_PAGES,
    Fingerprint,
    bytes_only_note,
)

logger = logging.getLogger(__name__)

INVOICE_NUMBER_MAX_CHARS: Final = 100  # what a custom pattern captures is cut here

# "Invoice No. 1042", "Rechnung Nr. 2024-17", "Facture N° F-88", "Factura nº 12",
# "Fattura n. 7", "Factuur nr 55", "Invoice number: INV-1042", "Invoice #1042".
DEFAULT_INVOICE_NUMBER_PATTERN: Final = (
    r"(?i)\b(?:invoice|rechnung|facture|factura|fattura|factuur)"
    r"(?:s?nummer|s?nr\.?)?"
    r"[ \t]*(?:number|num[eé]ro|n[uú]mero|nummer|no\.?|nr\.?|n[°º]|n\.|#)?"
    r"[ \t]*[:#]?[ \t]*"
    r"(?P<number>(?=[A-Z0-9./-]*\d)[A-Z0-9](?:[A-Z0-9./-]*[A-Z0-9])?)"
)

_EOF_WINDOW: Final = 1024
_TEXT_LIMIT: Final = 20_000


def inspect_pdf(
    data: bytes,
    *,
    invoice_pattern: re.Pattern[str] | None = None,
    fingerprint: bool = True,
    fingerprint_budget_seconds: float | None = None,
    credit_note_pattern: re.Pattern[str] | None = None,
) -> PdfReport:
    """Decide whether `data` is an accepted PDF; fingerprint it and read its invoice number.

    `fingerprint=False` validates and reads the number only (to measure what the
    fingerprint costs). Once `fingerprint_budget_seconds` are spent the fingerprint is
    given up, with a note, but validation goes on to the end.
    """
    head = data[:1024].lstrip()
    if not head.startswith(b"%PDF-"):
        return PdfReport(accepted=False, reason=f"not a PDF ({_describe_start(data, head)})")
    budget = fingerprint_budget_seconds
    deadline = None if budget is None else time.monotonic() + budget
    walker = Fingerprint(enabled=fingerprint, deadline=deadline)
    with apply_configuration(**PYPDF_LIMITS):
        try:
            return _inspect(
                data,
                invoice_pattern or _default_pattern(),
                fingerprint=walker,
                credit_notes=credit_note_pattern,
            )
        except Unparseable as exc:
            return PdfReport(accepted=False, reason=f"unparseable PDF: {exc}")
        except RecursionError:
            return PdfReport(accepted=False, reason="unparseable PDF: nested too deeply")
        except READ_ERRORS as exc:
            if our_bug(exc):
                raise  # the check failed, not the file: see `our_bug`
            return PdfReport(accepted=False, reason=f"unparseable PDF: {short(exc)}")


@functools.cache
def _default_pattern() -> re.Pattern[str]:
    return re.compile(DEFAULT_INVOICE_NUMBER_PATTERN)


def _describe_start(data: bytes, head: bytes) -> str:
    if not head:
        return "only whitespace" if data else "empty"
    return f"starts with {head[:8]!r}"


def _inspect(
    data: bytes,
    pattern: re.Pattern[str],
    *,
    fingerprint: Fingerprint,
    credit_notes: re.Pattern[str] | None = None,
) -> PdfReport:
    if b"%%EOF" not in data[-_EOF_WINDOW:]:
        raise Unparseable("no %%EOF marker at the end (truncated?)")
    reader = PdfReader(io.BytesIO(data), strict=False)
    encrypted = reader.is_encrypted
    if encrypted:
        try:
            opened = reader.decrypt("") != PasswordType.NOT_DECRYPTED
        except (*READ_ERRORS, DependencyError, NotImplementedError) as exc:
            if our_bug(exc):
                raise
            opened = False
        if not opened:
            return PdfReport(
                accepted=True,
                encrypted=True,
                fingerprint=None,
                fingerprint_note=bytes_only_note("encrypted with a password"),
            )
    if not isinstance(reader.trailer.get("/Root", NullObject()).get_object(), DictionaryObject):
        raise Unparseable("no document catalog")
    page_count = len(reader.pages)
    if page_count == 0:
        raise Unparseable("no pages")
    for number, page in enumerate(reader.pages, start=1):
        try:
            fingerprint.add_page(reader, page, number)
        except Unparseable:
            raise
        except READ_ERRORS as exc:
            if our_bug(exc):
                raise
            raise Unparseable(f"page {number}: {short(exc)}") from exc
        except (DependencyError, NotImplementedError, RecursionError) as exc:
            fingerprint.give_up(f"page {number}: {short(exc)}")
    text = _first_text(reader)
    invoice_number, ambiguous = _invoice_number(text, pattern)
    return PdfReport(
        accepted=True,
        encrypted=encrypted,
        pages=page_count,
        fingerprint=fingerprint.hexdigest(),
        fingerprint_note=fingerprint.note,
        invoice_number=invoice_number,
        invoice_number_ambiguous=ambiguous,
        # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN, on the same bounded first-page text.
        credit_note=credit_notes is not None and credit_notes.search(text) is not None,
    )


def _first_text(reader: PdfReader) -> str:
    """The text of the first pages, at most `_TEXT_LIMIT` characters ("" when unreadable)."""
    text = ""
    try:
        for page in reader.pages[:TEXT_PAGES]:
            text += page.extract_text() + "\n"
            if len(text) >= _TEXT_LIMIT:
                break
    except (*READ_ERRORS, DependencyError, NotImplementedError, RecursionError) as exc:
        if our_bug(exc):
            raise
        logger.debug("text extraction failed", exc_info=True)
    return text[:_TEXT_LIMIT]


def _invoice_number(text: str, pattern: re.Pattern[str]) -> tuple[str | None, bool]:
    """The first number the pattern reads in `text`, and whether the first pages read
    as several different ones (the same number repeated, on every page's head say, is
    not): then nobody can tell which is the invoice's."""
    numbers: list[str] = []
    for match in pattern.finditer(text):
        number = _captured(match, pattern)
        if number and number not in numbers:
            numbers.append(number)
            if len(numbers) > 1:
                break
    return (numbers[0] if numbers else None), len(numbers) > 1


def _captured(match: re.Match[str], pattern: re.Pattern[str]) -> str | None:
    if "number" in pattern.groupindex:
        number = match.group("number")
    else:
        number = match.group(1) if pattern.groups else match.group(0)
    # PDF text is a stranger's: it reaches the audit table and CSV like a subject does.
    return clean_text(number, INVOICE_NUMBER_MAX_CHARS) or None if number else None
