"""A mail's bytes as `SmtpOutbox` writes them: dot-stuffed for DATA, raw for BDAT.

Both are produced piece by piece so that a large PDF is never held whole twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from email import policy
from email.message import EmailMessage

from worker.delivery import pipelined
from worker.delivery.framing import forward_pieces, stuffed_slices
from worker.delivery.message import RELAY_HEADER, ForwardMail

__all__ = ["raw_pieces", "sha256_of", "stuffed_pieces"]


def raw_pieces(message: ForwardMail | EmailMessage) -> list[bytes] | Iterator[bytes]:
    """The content as BDAT carries it: no dot-stuffing, no terminating dot."""
    if isinstance(message, ForwardMail):
        return _forward_raw(message)
    content = message.as_bytes(policy=policy.SMTP)
    return [content if content.endswith(b"\r\n") else content + b"\r\n"]


def _forward_raw(mail: ForwardMail) -> Iterator[bytes]:
    yield mail.head
    yield from mail.attachment_slices(pipelined.CHUNK)
    yield mail.tail


def stuffed_pieces(message: ForwardMail | EmailMessage) -> Iterator[bytes]:
    """The content as DATA carries it: dot-stuffed, 1 MiB at a time, without the dot."""
    if isinstance(message, ForwardMail):
        return forward_pieces(message)
    return stuffed_slices(message.as_bytes(policy=policy.SMTP))


def sha256_of(message: ForwardMail | EmailMessage) -> str:
    """The fingerprint a refusal names: the forwarded PDF's, or a notice's relay header."""
    if isinstance(message, ForwardMail):
        return message.sha256
    return str(message.get(RELAY_HEADER, ""))
