"""The DATA command's framing: dot-stuffing, 1 MiB writes, and the terminating dot held
back for a hook (`SmtpOutbox.deliver(before_final=...)`)."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable, Iterable, Iterator

from worker.delivery.message import ForwardMail

_DATA_CHUNK = 1 << 20
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _stuffed(text: bytes) -> bytes:
    return _LEADING_DOT.sub(b"..", text)


def forward_pieces(mail: ForwardMail) -> Iterator[bytes]:
    """A forwarded mail for DATA: base64 lines never start with a dot, so only the head
    and the tail are dot-stuffed; the attachment is encoded 1 MiB at a time."""
    yield _stuffed(mail.head)
    yield from mail.attachment_slices(_DATA_CHUNK)
    yield _stuffed(mail.tail)


def stuffed_slices(content: bytes) -> Iterator[bytes]:
    """Any other mail for DATA: 1 MiB slices, each ending after a line break,
    dot-stuffed one by one (smtplib's `data()` would make three whole copies)."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"  # the terminating dot must start a line
    view = memoryview(content)
    start = 0
    while start < len(content):
        end = content.find(b"\n", min(start + _DATA_CHUNK, len(content)) - 1)
        end = len(content) if end < 0 else end + 1
        yield _stuffed(view[start:end].tobytes())
        start = end


class Abandoned(Exception):  # a carrier, never seen outside worker.delivery
    """What `before_end` raised, carried past the handlers of SMTP failures."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def data(
    smtp: smtplib.SMTP,
    pieces: Iterable[bytes],
    before_end: Callable[[], None] | None,
    *,
    then: bytes = b"",
    command_sent: bool = False,
) -> tuple[int, bytes]:
    """DATA with the content in `pieces` (dot-stuffed, together ending in CRLF), gathered
    into writes of about 1 MiB. Without `before_end` the terminating dot goes in the
    last write; with it, it runs once the content went out and the dot follows on its
    own (the socket has TCP_NODELAY: a small write after another would otherwise wait on
    Nagle's algorithm and the receiver's delayed ACK, 40 ms a mail).

    `then` (the next mail's pipelined envelope) goes out with the dot; `command_sent`
    when DATA ended a pipelined group already and only its 354 is to be read."""
    if not command_sent:
        smtp.putcmd("data")
    code, answer = smtp.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, answer)
    gathered: list[bytes] = []
    size = 0
    for piece in pieces:
        if gathered and size + len(piece) > _DATA_CHUNK:
            smtp.send(b"".join(gathered))
            gathered, size = [], 0
        gathered.append(piece)
        size += len(piece)
    if before_end is None:
        gathered.append(b".\r\n" + then)
        smtp.send(b"".join(gathered))
        return smtp.getreply()
    smtp.send(b"".join(gathered))
    try:
        before_end()
    except Exception as exc:
        raise Abandoned(exc) from exc
    smtp.send(b".\r\n" + then)
    return smtp.getreply()
