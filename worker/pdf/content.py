"""Content streams: parsed once, written back in one canonical form for the fingerprint.

Also the errors `worker.pdf.inspection` reports a damaged file with.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any, Final

import pypdf
from pypdf import PdfReader
from pypdf.errors import PyPdfError
from pypdf.generic import (
    ArrayObject,
    ByteStringObject,
    ContentStream,
    DecodedStreamObject,
    DictionaryObject,
    create_string_object,
)

from worker.mail.text import clean_text

READ_ERRORS: Final = (PyPdfError, ValueError, KeyError, TypeError, AttributeError, zlib.error)


_PYPDF_CODE: Final = os.path.dirname(pypdf.__file__) + os.sep


class Unparseable(Exception):
    """The file is damaged: the reason becomes the report's."""


def our_bug(exc: BaseException) -> bool:
    """Whether `exc`, caught among READ_ERRORS, is a mistake of our own code rather than
    pypdf failing on a damaged file: a TypeError or AttributeError with no pypdf code
    on its way up. pypdf raises those on hostile files (the file is then rejected);
    ours raise them only by mistake, and a mistake must not reject an invoice for good:
    re-raised, it makes the check fail, and the sighting is an `error`, tried again."""
    if not isinstance(exc, TypeError | AttributeError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.startswith(_PYPDF_CODE):
            return False
        frame = frame.tb_next
    return True


def short(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for a reason."""
    lines = str(exc).strip().splitlines()
    text = clean_text(lines[0], 160) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def text_content(reader: PdfReader, data: bytes, where: str) -> ContentStream:
    """The decoded content stream `data` parsed as pypdf's text extraction does: every
    string operand a `ByteStringObject` of its raw bytes (`forced_encoding="bytes"`)."""
    stream = DecodedStreamObject()
    stream.set_data(data)
    try:
        content = ContentStream(stream, reader, "bytes")
        content.operations  # noqa: B018 - parses now, so damage is reported here
    except READ_ERRORS as exc:
        if our_bug(exc):
            raise
        raise Unparseable(f"{where}: content stream: {short(exc)}") from exc
    return content


def _as_parsed_plain(operand: Any) -> Any:
    """An operand of a `forced_encoding="bytes"` parse as a plain parse would have read
    it: `create_string_object` of the raw bytes, which is what the plain parse calls.
    Keeps the fingerprint of a shared parse identical to that of its own parse."""
    if isinstance(operand, ByteStringObject):
        return create_string_object(bytes(operand))
    if isinstance(operand, ArrayObject):
        return ArrayObject(_as_parsed_plain(item) for item in operand)
    if isinstance(operand, DictionaryObject):
        plain = DictionaryObject()
        for key, value in operand.items():
            plain[key] = _as_parsed_plain(value)
        return plain
    return operand


def canonical_operations(
    reader: PdfReader, data: bytes, where: str, *, parsed: ContentStream | None = None
) -> bytes:
    """The content stream written back in one canonical form, whatever wrote it first.
    With `parsed` (see `text_content`), its operations are used instead of parsing."""
    operations: list[tuple[Any, bytes]]
    if parsed is not None:
        operations = [
            (operands, operator)
            if operator == b"INLINE IMAGE"  # its settings were read without forcing
            else ([_as_parsed_plain(operand) for operand in operands], operator)
            for operands, operator in parsed.operations
        ]
    else:
        stream = DecodedStreamObject()
        stream.set_data(data)
        try:
            operations = ContentStream(stream, reader).operations
        except READ_ERRORS as exc:
            if our_bug(exc):
                raise
            raise Unparseable(f"{where}: content stream: {short(exc)}") from exc
    out = io.BytesIO()
    for operands, operator in operations:
        if operator == b"INLINE IMAGE":
            operands["settings"].write_to_stream(out)
            out.write(b" ID ")
            out.write(operands["data"])
            out.write(b" EI\n")
            continue
        for operand in operands:
            operand.write_to_stream(out)
            out.write(b" ")
        out.write(operator)
        out.write(b"\n")
    return out.getvalue()
