"""Validation, content fingerprint and invoice number of one PDF.

`inspect_pdf` decides everything about one file; `worker.pdf.pool.PdfInspector` runs it
in guarded worker processes, so a hostile PDF can neither hang nor crash a poll.

A PDF is accepted when it
- starts with `%PDF-` (after optional whitespace) and ends with `%%EOF` within its last
  1024 bytes (where readers look for it; a file without it was cut short),
- opens with pypdf, has a catalog and at least one page,
- and every page's content stream, and every image or form the page draws, decodes
  (a compressed stream that zlib reports as corrupt counts as not decoding).
The fingerprint `fp1:<sha256>` covers what determines each page's appearance: page
size and rotation, the content stream re-serialised in pypdf's canonical form (so
whitespace, number formatting and compression do not matter), the fonts' names, and
the decoded data of each XObject the page uses. Metadata, XMP, /ID, dates, producer
and object numbers are left out, so re-renders and re-saves of one invoice match
(values are read through indirect references: qpdf moves a /MediaBox into an object of
its own). Without a fingerprint (encrypted, a filter pypdf cannot decode, time budget
spent) `fingerprint_note` says why, and the store keys the file by its bytes hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
import time
import zlib
from typing import Any, Final

from pypdf import PasswordType, PdfReader, apply_configuration
from pypdf.errors import DependencyError
from pypdf.generic import (
    ArrayObject,
    DictionaryObject,
    NameObject,
    NullObject,
    PdfObject,
    StreamObject,
)

from worker.mail.text import clean_text
from worker.models import PdfReport
from worker.pdf.content import (
    READ_ERRORS,
    Unparseable,
    canonical_operations,
    our_bug,
    short,
    text_content,
)

logger = logging.getLogger(__name__)

FINGERPRINT_PREFIX: Final = "fp1:"
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

_MIB: Final = 1 << 20
# pypdf's own decoding limits, lowered from its defaults (75 MB) for invoices.
_PYPDF_LIMITS: Final[dict[str, Any]] = {
    "jbig2dec_binary": None,  # never run the external jbig2dec program on mail input
    "disable_legacy_handling": True,
    "maximum_declared_stream_length": 32 * _MIB,
    "zlib_maximum_output_length": 64 * _MIB,
    "lzw_maximum_output_length": 64 * _MIB,
    "run_length_maximum_output_length": 64 * _MIB,
    "brotli_maximum_output_length": 64 * _MIB,
    "array_based_stream_maximum_output_length": 64 * _MIB,
    "image_maximum_buffer_size": 64 * _MIB,
}
_EOF_WINDOW: Final = 1024
_TEXT_PAGES: Final = 2
_TEXT_LIMIT: Final = 20_000
_MAX_XOBJECT_DEPTH: Final = 8
_MAX_XOBJECTS: Final = 1_000
_SUBSET_TAG = re.compile(r"^[A-Z]{6}\+")


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
    walker = _Fingerprint(enabled=fingerprint, deadline=deadline)
    with apply_configuration(**_PYPDF_LIMITS):
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


def bytes_only_note(why: str) -> str:
    """The report's `fingerprint_note`, and so the audit row's reason, when there is no
    fingerprint and the bytes hash alone identifies the file."""
    return f"no content fingerprint ({why}): deduplicated by SHA-256 only"


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
    fingerprint: _Fingerprint,
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
    return PdfReport(
        accepted=True,
        encrypted=encrypted,
        pages=page_count,
        fingerprint=fingerprint.hexdigest(),
        fingerprint_note=fingerprint.note,
        invoice_number=_invoice_number(text, pattern),
        # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN, on the same bounded first-page text.
        credit_note=credit_notes is not None and credit_notes.search(text) is not None,
    )


class _Fingerprint:
    """Walks what determines the pages' appearance, decoding every stream (that is the
    validation) and, while enabled and within its deadline, feeding it into a SHA-256."""

    def __init__(self, *, enabled: bool, deadline: float | None) -> None:
        self.digest = hashlib.sha256()
        self.hashing = enabled
        self.deadline = deadline
        self.note: str | None = None if enabled else bytes_only_note("not computed")
        self.budget = _MAX_XOBJECTS

    def hexdigest(self) -> str | None:
        return FINGERPRINT_PREFIX + self.digest.hexdigest() if self.hashing else None

    def give_up(self, why: str) -> None:
        if self.hashing:
            self.hashing = False
            self.note = bytes_only_note(why)

    def _feed(self, data: bytes) -> None:
        if self.hashing:
            self.digest.update(data)

    def _in_time(self) -> bool:
        if self.hashing and self.deadline is not None and time.monotonic() >= self.deadline:
            self.give_up("took longer than its time budget")
        return self.hashing

    def add_page(self, reader: PdfReader, page: DictionaryObject, number: int) -> None:
        self._in_time()
        self._feed(b"page %d\n" % number)
        box = _value(page, "/MediaBox")
        if isinstance(box, ArrayObject):
            self._feed(repr([round(float(value), 2) for value in box]).encode())
        rotate = _value(page, "/Rotate") or 0
        if not isinstance(rotate, int | float):
            raise Unparseable(f"page {number}: /Rotate is not a number")
        self._feed(b" rotate %d\n" % int(rotate))
        self._add_content(
            reader=reader,
            data=_page_contents(page, number),
            resources=_dictionary(page, "/Resources", f"page {number} resources"),
            where=f"page {number}",
            depth=0,
            page=page if number <= _TEXT_PAGES else None,
        )

    def _add_content(
        self,
        *,
        reader: PdfReader,
        data: bytes,
        resources: DictionaryObject,
        where: str,
        depth: int,
        page: DictionaryObject | None = None,
    ) -> None:
        if self._in_time():
            if page is None:
                self._feed(canonical_operations(reader, data, where))
            else:
                # The page's text is read later (`_invoice_number`): parsed the way
                # pypdf's text extraction parses it, and left under /Contents (in memory
                # only, nothing is written back), so that parse is shared.
                content = text_content(reader, data, where)
                self._feed(canonical_operations(reader, data, where, parsed=content))
                page[NameObject("/Contents")] = content
        fonts = _dictionary(resources, "/Font", f"{where} fonts")
        for name in sorted(fonts):
            font = _dictionary(fonts, name, f"{where} font {name}")
            base = _SUBSET_TAG.sub("", str(_value(font, "/BaseFont") or "").lstrip("/"))
            encoding = _value(font, "/Encoding")
            encoding_name = encoding if isinstance(encoding, NameObject) else ""
            subtype = _value(font, "/Subtype") or ""
            self._feed(f"font {name} {subtype} {base} {encoding_name}\n".encode())
        xobjects = _dictionary(resources, "/XObject", f"{where} XObjects")
        for name in sorted(xobjects):
            self.budget -= 1
            if self.budget < 0 or depth >= _MAX_XOBJECT_DEPTH:
                raise RecursionError(f"{where}: too many or too deeply nested XObjects")
            what = f"{where} XObject {name}"
            self._add_xobject(
                reader=reader, xobject=_lookup(xobjects, name, what), what=what, depth=depth
            )

    def _add_xobject(
        self, *, reader: PdfReader, xobject: PdfObject | None, what: str, depth: int
    ) -> None:
        if not isinstance(xobject, StreamObject):
            raise Unparseable(f"{what} is missing")
        self._in_time()
        subtype = _value(xobject, "/Subtype")
        self._feed(f"xobject {what} {subtype}\n".encode())
        if isinstance(subtype, NameObject) and subtype == "/Form":
            self._add_content(
                reader=reader,
                data=_decoded(xobject, what),
                resources=_dictionary(xobject, "/Resources", f"{what} resources"),
                where=what,
                depth=depth + 1,
            )
            return
        for key in ("/Width", "/Height", "/BitsPerComponent", "/ImageMask"):
            self._feed(f"{key}={_value(xobject, key)}\n".encode())
        self._feed(_image_bytes(xobject, what))
        mask = _lookup(xobject, "/SMask", f"{what} /SMask")
        if mask is not None:
            self._feed(b"smask\n" + _image_bytes(mask, f"{what} /SMask"))


def _value(container: DictionaryObject, key: str) -> PdfObject | None:
    """The value under `key` with any indirect reference followed; None when absent."""
    if key not in container:
        return None
    resolved: PdfObject | None = container.raw_get(key).get_object()
    return resolved


def _page_contents(page: DictionaryObject, number: int) -> bytes:
    contents = _lookup(page, "/Contents", f"page {number} content")
    if contents is None:
        return b""  # a blank page
    if isinstance(contents, ArrayObject):
        return b"\n".join(
            _decoded(item.get_object(), f"page {number} content") for item in contents
        )
    return _decoded(contents, f"page {number} content")


def _lookup(container: DictionaryObject, key: str, what: str) -> PdfObject | None:
    """The object under `key`, resolved; None when absent, but a dangling reference is damage."""
    if key not in container:
        return None
    resolved: PdfObject | None = container.raw_get(key).get_object()
    if resolved is None or isinstance(resolved, NullObject):
        raise Unparseable(f"{what} is missing")
    return resolved


def _dictionary(container: DictionaryObject, key: str, what: str) -> DictionaryObject:
    resolved = _lookup(container, key, what)
    if resolved is None:
        return DictionaryObject()
    if not isinstance(resolved, DictionaryObject):
        raise Unparseable(f"{what} is not a dictionary")
    return resolved


def _decoded(stream: PdfObject | None, what: str) -> bytes:
    """The stream's decoded bytes; raises `Unparseable` when the stream is damaged."""
    if not isinstance(stream, StreamObject):
        raise Unparseable(f"{what} is missing")
    filters = stream.get("/Filter")
    first = filters[0] if isinstance(filters, ArrayObject) and filters else filters
    if first in ("/FlateDecode", "/Fl"):
        _check_flate(getattr(stream, "_data", b""), what)
    try:
        return stream.get_data()
    except (DependencyError, NotImplementedError):
        raise
    except READ_ERRORS as exc:
        if our_bug(exc):
            raise
        raise Unparseable(f"{what}: {short(exc)}") from exc


def _check_flate(raw: bytes, what: str) -> None:
    """pypdf silently recovers what it can from a corrupt zlib stream; we want to know."""
    limit: int = _PYPDF_LIMITS["zlib_maximum_output_length"]
    try:
        zlib.decompressobj().decompress(raw, limit)
    except zlib.error as exc:
        if "header" not in str(exc):
            raise Unparseable(f"{what}: corrupt compressed data ({exc})") from exc
        try:  # some writers omit the zlib header: raw deflate data
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, limit)
        except zlib.error as raw_exc:
            raise Unparseable(f"{what}: corrupt compressed data ({raw_exc})") from raw_exc


def _image_bytes(image: PdfObject | None, what: str) -> bytes:
    try:
        return _decoded(image, what)
    except (DependencyError, NotImplementedError):
        # A filter pypdf cannot (or may not) decode, such as JBIG2: the encoded bytes
        # still identify the image as long as nobody re-encodes it.
        return bytes(getattr(image, "_data", b""))


def _first_text(reader: PdfReader) -> str:
    """The text of the first pages, at most `_TEXT_LIMIT` characters ("" when unreadable)."""
    text = ""
    try:
        for page in reader.pages[:_TEXT_PAGES]:
            text += page.extract_text() + "\n"
            if len(text) >= _TEXT_LIMIT:
                break
    except (*READ_ERRORS, DependencyError, NotImplementedError, RecursionError) as exc:
        if our_bug(exc):
            raise
        logger.debug("text extraction failed", exc_info=True)
    return text[:_TEXT_LIMIT]


def _invoice_number(text: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    if "number" in pattern.groupindex:
        number = match.group("number")
    else:
        number = match.group(1) if pattern.groups else match.group(0)
    # PDF text is a stranger's: it reaches the audit table and CSV like a subject does.
    return clean_text(number, INVOICE_NUMBER_MAX_CHARS) or None if number else None
