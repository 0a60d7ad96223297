"""The one transfer decoder: Content-Transfer-Encoding undone, and the PDF test.

base64 is read leniently, by one set of rules, whether a part comes whole
(`decode_transfer`) or range by range (`Base64Stream`, which `decode_transfer` itself
uses for anything not well-formed):

* ASCII whitespace (line breaks, spaces, tabs, VT, FF) is dropped wherever it appears.
* Any other character outside the alphabet and '=' raises
  ValueError("broken base64: byte 0x.. at offset N"), N counting without whitespace.
* Some encoders pad each line, so '=' may appear mid-text: each run of text between
  padding is decoded on its own, and repeated or missing padding does not matter.
* A run whose length leaves one character over (less than one octet) drops it; a run
  cut short mid-quantum still yields its whole octets.

"Is a PDF" means: the decoded bytes start with `%PDF-`, after optional ASCII
whitespace within the first 1024 octets.
"""

from __future__ import annotations

import binascii
import io
import re

PDF_MAGIC = b"%PDF-"

_MAGIC_WINDOW = 1024  # leading whitespace tolerated before %PDF-
_ASCII_WHITESPACE = b" \t\r\n\x0b\x0c"
_ALPHABET = re.compile(rb"[A-Za-z0-9+/=]*")
_INVALID = re.compile(rb"[^A-Za-z0-9+/=]")
_PADDING = re.compile(rb"=+")


class Base64Stream:
    """Decodes base64 fed in pieces cut anywhere, by the module's rules; the pieces'
    concatenation decodes to what `decode_transfer` gives for it whole."""

    def __init__(self) -> None:
        self._decoded = io.BytesIO()
        self._carry = b""  # fewer than 4 alphabet characters waiting for the rest
        self._offset = 0  # characters seen, whitespace left out

    def feed(self, raw: bytes) -> None:
        """Decode what `raw` completes; raises ValueError("broken base64: ...")."""
        compact = raw.translate(None, _ASCII_WHITESPACE)
        invalid = _INVALID.search(compact)
        if invalid is not None:
            raise ValueError(
                f"broken base64: byte 0x{compact[invalid.start()]:02x} "
                f"at offset {self._offset + invalid.start()}"
            )
        self._offset += len(compact)
        runs = _PADDING.split(compact)
        for index, run in enumerate(runs):
            text = self._carry + run if index == 0 else run
            if index < len(runs) - 1:  # padding follows: this run is complete
                self._flush(text)
                self._carry = b""
                continue
            whole = len(text) - len(text) % 4
            if whole:
                self._decoded.write(binascii.a2b_base64(text[:whole]))
            self._carry = text[whole:]

    def _flush(self, text: bytes) -> None:
        usable = len(text) - (1 if len(text) % 4 == 1 else 0)  # one char is < 1 octet
        if usable:
            self._decoded.write(binascii.a2b_base64(text[:usable] + b"=" * (-usable % 4)))

    def finish(self) -> bytes:
        """The decoded bytes (without a copy: the stream is done with them)."""
        self._flush(self._carry)
        self._carry = b""
        return self._decoded.getvalue()


def decode_base64(raw: bytes) -> bytes:
    """`raw` decoded by the module's rules; raises ValueError("broken base64: ...")."""
    compact = raw.translate(None, _ASCII_WHITESPACE)
    try:  # well-formed base64, nearly every mail: one pass in C, the same bytes
        return binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error:
        pass
    stream = Base64Stream()
    stream.feed(compact)
    return stream.finish()


def decode_transfer(raw: bytes, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding; unknown encodings leave the bytes unchanged.

    base64 by the module's rules; raises ValueError("broken base64: ...") when
    characters other than the alphabet, '=' and whitespace appear.
    """
    kind = encoding.strip().lower()
    if kind == "base64":
        return decode_base64(raw)
    if kind == "quoted-printable":
        return binascii.a2b_qp(raw)
    return raw


def probe_is_pdf(prefix: bytes, encoding: str) -> bool:
    """Whether the first raw (still transfer-encoded) octets of a part decode to a PDF start.

    The prefix may be cut anywhere, mid base64 quantum or mid quoted-printable escape;
    base64 is read up to the first character that is not base64.
    """
    kind = encoding.strip().lower()
    if kind == "base64":
        compact = prefix.translate(None, _ASCII_WHITESPACE)
        valid = _ALPHABET.match(compact)
        stream = Base64Stream()
        stream.feed(valid.group() if valid else b"")
        return is_pdf_bytes(stream.finish())
    try:
        return is_pdf_bytes(decode_transfer(prefix, kind))
    except ValueError:
        return False


def is_pdf_bytes(data: bytes) -> bool:
    """Whether decoded bytes start with `%PDF-`, after optional ASCII whitespace."""
    return data[:_MAGIC_WINDOW].lstrip(_ASCII_WHITESPACE).startswith(PDF_MAGIC)
