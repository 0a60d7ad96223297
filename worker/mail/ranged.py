"""Large parts fetched in ranges and decoded as they arrive.

A 25 MB PDF is 34 MB of base64 on the wire. Fetched whole, the raw text, its copy
without line breaks, the pieces between padding and the decoded bytes are alive at once
(more than five times the PDF). `fetch_decoded` asks for `BODY.PEEK[section]<offset.n>`
one range at a time and feeds each to a `worker.mail.transfer.Base64Stream`, so only one
range of raw text is held beside the decoded bytes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from worker.mail.transfer import Base64Stream

RANGE_BYTES = 1 << 20  # raw octets per FETCH of a large part
LARGE_PART = 8 << 20  # raw size from which a base64 part is fetched in ranges


@runtime_checkable
class RangedFetch(Protocol):
    """A mailbox that can fetch one range of a part (`worker.imap.mailbox.ImapMailbox` can;
    a `worker.relay.ports.Mailbox` without it gets large parts whole)."""

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        """`length` raw octets of a section from `offset`: empty past the end, None when
        the server returned nothing for it."""


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
