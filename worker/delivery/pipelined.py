"""SMTP's envelope pipelined (RFC 2920) and the content sent by BDAT (RFC 3030).

smtplib waits for an answer after every command; these functions write several
commands over its connection and read their answers afterwards, in order
(`smtplib.SMTP.send` and `getreply`, which reads from a buffer and so can take several
answers that came in one segment). They never classify an answer: `SmtpOutbox` does,
as the README's "SMTP answers" says.

RFC 2920 §3.1: MAIL and RCPT may be pipelined; DATA may end a group, after which the
client waits for 354. RFC 3030 §4.2: BDAT may be pipelined too, and every BDAT gets an
answer; `BDAT <n> LAST` carries the last chunk and ends the mail.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterable, Iterator

from worker.delivery.framing import Abandoned

CHUNK = 1 << 20  # a BDAT chunk: the content is never held whole twice


def envelope(sender: str, recipient: str, *, data: bool = False) -> bytes:
    """MAIL FROM and RCPT TO (and DATA, which must end a group) as one write."""
    lines = [f"MAIL FROM:{smtplib.quoteaddr(sender)}", f"RCPT TO:{smtplib.quoteaddr(recipient)}"]
    if data:
        lines.append("DATA")
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")


def chunks(pieces: Iterable[bytes], size: int = CHUNK) -> Iterator[tuple[bytes, bool]]:
    """The content in chunks of at least `size` bytes (the last may be smaller), each
    with whether it is the last; at least one chunk, however short the content."""
    gathered: list[bytes] = []
    held = 0
    ready: bytes | None = None
    for piece in pieces:
        gathered.append(piece)
        held += len(piece)
        if held >= size:
            if ready is not None:
                yield ready, False
            ready, gathered, held = b"".join(gathered), [], 0
    rest = b"".join(gathered)
    if ready is None:
        yield rest, True
    elif rest:
        yield ready, False
        yield rest, True
    else:
        yield ready, True


def bdat_command(chunk: bytes, *, last: bool) -> bytes:
    return f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode("ascii") + chunk


def send_bdat(
    smtp: smtplib.SMTP,
    pieces: Iterable[bytes],
    before_end: Callable[[], None] | None,
    *,
    first: bytes = b"",
    then: bytes = b"",
) -> int:
    """The content as BDAT chunks, written without waiting for their answers; returns
    how many answers the caller must read. `before_end` runs before the chunk that
    carries LAST (whatever it raises comes out as `Abandoned`); `first` (this mail's
    envelope) goes out in the first write, `then` (the next mail's envelope) in the
    same write as the last chunk: one segment where one will do, so the server never
    answers between them."""
    sent = 0
    for chunk, last in chunks(pieces):
        if not last:
            smtp.send(first + bdat_command(chunk, last=False))
            first = b""
            sent += 1
            continue
        if before_end is not None:
            if first:  # out before the hook, which may wait for the last mail's mark
                smtp.send(first)
                first = b""
            try:
                before_end()
            except Exception as exc:
                raise Abandoned(exc) from exc
        smtp.send(first + bdat_command(chunk, last=True) + then)
        sent += 1
    return sent


def read_replies(smtp: smtplib.SMTP, count: int) -> list[tuple[int, bytes]]:
    """`count` answers, in the order of the commands that asked for them."""
    return [smtp.getreply() for _ in range(count)]


def must_drop(smtp: smtplib.SMTP) -> bool:
    """After a refused envelope, read the pipelined DATA's answer: a server that still
    said 354 expects content, and only a new session is clean (True); so too when no
    answer came. Otherwise RSET makes the session usable again (False)."""
    try:
        code, _ = smtp.getreply()
    except (smtplib.SMTPException, OSError):
        return True
    return code == 354
