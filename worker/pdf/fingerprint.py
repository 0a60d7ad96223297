"""The content fingerprint of one PDF, and the walk over its pages that validates it.

The fingerprint `fp1:<sha256>` covers what determines each page's appearance: page
size and rotation, the content stream re-serialised in pypdf's canonical form (so
whitespace, number formatting and compression do not matter), the fonts' names, and
the decoded data of each XObject the page uses. Metadata, XMP, /ID, dates, producer
and object numbers are left out, so re-renders and re-saves of one invoice match
(values are read through indirect references: qpdf moves a /MediaBox into an object of
its own). Without a fingerprint (encrypted, a filter pypdf cannot decode, time budget
spent) the report's `fingerprint_note` says why, and the store keys the file by its
bytes hash.

`worker.pdf.inspection.inspect_pdf` runs the walk (`Fingerprint`) on every page, under
`PYPDF_LIMITS`; the walk raises `Unparseable` for a stream that does not decode.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from typing import Any, Final

from pypdf import PdfReader
from pypdf.errors import DependencyError
from pypdf.generic import (
    ArrayObject,
    DictionaryObject,
    NameObject,
    NullObject,
    PdfObject,
    StreamObject,
)

from worker.pdf.content import (
    READ_ERRORS,
    Unparseable,
    canonical_operations,
    our_bug,
    short,
    text_content,
)

FINGERPRINT_PREFIX: Final = "fp1:"
_MIB: Final = 1 << 20
# pypdf's own decoding limits, lowered from its defaults (75 MB) for invoices.
PYPDF_LIMITS: Final[dict[str, Any]] = {
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
TEXT_PAGES: Final = 2  # the first pages: their text is read for the invoice number
_MAX_XOBJECT_DEPTH: Final = 8
_MAX_XOBJECTS: Final = 1_000
_SUBSET_TAG = re.compile(r"^[A-Z]{6}\+")


def bytes_only_note(why: str) -> str:
    """The report's `fingerprint_note`, and so the audit row's reason, when there is no
    fingerprint and the bytes hash alone identifies the file."""
    return f"no content fingerprint ({why}): deduplicated by SHA-256 only"


class Fingerprint:
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
            page=page if number <= TEXT_PAGES else None,
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
                # The page's text is read later (the invoice number, in
                # `worker.pdf.inspection`): parsed the way pypdf's text extraction
                # parses it, and left under /Contents (in memory only, nothing is
                # written back), so that parse is shared.
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
    limit: int = PYPDF_LIMITS["zlib_maximum_output_length"]
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
