"""Large parts fetched in ranges and decoded as they arrive.

A 25 MB PDF is 34 MB of base64 on the wire. Fetched whole, the raw text, its copy
without line breaks, the pieces between padding and the decoded bytes are alive at once
(more than five times the PDF). `fetch_decoded` asks for `BODY.PEEK[section]<offset.n>`
one range at a time and feeds each to a `Base64Stream`, so only one range of raw text is
held beside the decoded bytes.
"""

from __future__ import annotations

import binascii
import io
import re
from typing import Protocol, runtime_checkable

RANGE_BYTES = 1 << 20  # raw octets per FETCH of a large part
LARGE_PART = 8 << 20  # raw size from which a base64 part is fetched in ranges

_ASCII_WHITESPACE = b" \t\r\n\x0b\x0c"
_INVALID = re.compile(rb"[^A-Za-z0-9+/=]")
_PADDING = re.compile(rb"=+")


@runtime_checkable
class RangedFetch(Protocol):
    """A mailbox that can fetch one range of a part (`worker.imap.mailbox.ImapMailbox` can;
    a `worker.relay.ports.Mailbox` without it gets large parts whole)."""

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        """`length` raw octets of a section from `offset`: empty past the end, None when
        the server returned nothing for it."""


class Base64Stream:
    """Decodes base64 fed in pieces cut anywhere, as leniently as
    `worker.mail.mime.decode_transfer`: whitespace is dropped, each run of text between
    padding is decoded on its own, a last quantum cut short yields its whole octets.
    Anything else raises ValueError("broken base64: ...")."""

    def __init__(self) -> None:
        self._decoded = io.BytesIO()
        self._carry = b""  # fewer than 4 alphabet characters waiting for the rest
        self._offset = 0  # characters seen, whitespace left out

    def feed(self, raw: bytes) -> None:
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


def fetch_decoded(
    mailbox: RangedFetch, uid: int, section: str, *, range_bytes: int = RANGE_BYTES
) -> bytes | None:
    """A base64 part fetched `range_bytes` at a time and decoded; None when the server
    returned nothing for it (the part vanished). Raises ValueError for broken base64."""
    stream = Base64Stream()
    offset = 0
    while True:
        piece = mailbox.fetch_range(uid, section, offset=offset, length=range_bytes)
        if piece is None:
            if offset == 0:
                return None
            break
        stream.feed(piece)
        offset += len(piece)
        if len(piece) < range_bytes:
            break
        del piece
    return stream.finish()
