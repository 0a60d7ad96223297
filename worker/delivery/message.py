"""The forwarded mail (README, "Forwarded mail"), built as bytes without `email`.

`build_forward` is pure: one `Parcel` to one `ForwardMail`, the wire form of a
multipart/mixed mail with a quoted-printable text part and the PDF in base64. The
headers are written here directly: `email`'s header registry and generator cost more
than the SMTP round trips of a small invoice, and they hold the whole attachment as a
base64 string (34 MB for a 25 MB PDF) before serialising it once more. The attachment is
encoded slice by slice while it is sent (`ForwardMail.attachment_slices`).
"""

from __future__ import annotations

import binascii
import hashlib
import re
import secrets
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid

from worker.mail.text import clean_filename, clean_text
from worker.models import Notice, Parcel

RELAY_HEADER = "X-Invoice-Relay"
NOTICE_HEADER = "X-Invoice-Relay-Notice"  # read by the loop guard, worker.mail.verdicts
DEFAULT_RELAY_ID = "invoice-relay"
SUBJECT_LIMIT = 200
FILENAME_LIMIT = 200
BODY_FIELD_LIMIT = 300

_HEX = re.compile(r"[0-9a-f]+")
_RELAY_ID = re.compile(r"[A-Za-z0-9.-]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_LINE = 76  # base64 characters per line, as RFC 2045 asks
_LINE_INPUT = _LINE // 4 * 3  # the 57 PDF bytes one line encodes
_FOLD_AT = 78
_WORD_BYTES = 45  # UTF-8 bytes per encoded word: "=?utf-8?b?" + 60 + "?=" = 72 characters
_PARAMETER_PIECE = 60  # characters of one RFC 2231 continuation


# --- cleaning what came from the original mail --------------------------------------


def attachment_filename(value: str) -> str:
    """The forwarded attachment's name (`worker.mail.text.clean_filename`, at most
    `FILENAME_LIMIT`); "invoice.pdf" when nothing is left."""
    return clean_filename(value, FILENAME_LIMIT) or "invoice.pdf"


def forward_message_id(
    sha256: str,
    resend_count: int,
    *,
    destination: str | None = None,
    relay_id: str = DEFAULT_RELAY_ID,
) -> str:
    """The forwarded mail's Message-ID: the same for every retry of one send.

    It derives from the destination too, so that one PDF forwarded to two destinations
    is two deliveries (a receiver reading both inboxes keeps both). A deliberate resend
    (`resend_count` > 0) gets a new one, so the receiver does not discard it as a copy
    of the first. A document older than destinations (`destination` None) keeps the
    form it had then, so its retries across the upgrade stay one delivery.
    """
    digest = sha256.lower()
    if not _HEX.fullmatch(digest):
        raise ValueError(f"sha256 must be hexadecimal, got {sha256!r}")
    if resend_count < 0:
        raise ValueError(f"resend_count must not be negative, got {resend_count}")
    if not _RELAY_ID.fullmatch(relay_id):
        raise ValueError(f"relay_id must be a plain domain-like word, got {relay_id!r}")
    if destination is None:
        return f"<{digest[:32]}.{resend_count}@{relay_id}>"
    if not destination:
        raise ValueError("destination must not be empty")
    bound = hashlib.blake2b(destination.encode("utf-8"), digest_size=5).hexdigest()
    return f"<{digest[:32]}.{bound}.{resend_count}@{relay_id}>"


def _describe_date(value: datetime | None) -> str:
    if value is None:
        return "unknown"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return format_datetime(aware)


def _body(document: Parcel, filename: str) -> str:
    def field(value: str) -> str:
        return clean_text(value, BODY_FIELD_LIMIT) or "unknown"

    return (
        "invoice-relay forwarded this invoice.\n"
        "\n"
        f"Original sender: {field(document.original_sender)}\n"
        f"Original date: {_describe_date(document.original_date)}\n"
        f"Original Message-ID: {field(document.original_message_id)}\n"
        f"File: {filename}\n"
        f"SHA-256: {document.sha256.lower()}\n"
    )


# --- header encoding ---------------------------------------------------------------


def _plain(value: str) -> bool:
    """Whether a value can go into a header as it is: printable ASCII, no encoded word."""
    return _PRINTABLE_ASCII.fullmatch(value) is not None and "=?" not in value


def _fold(name: str, value: str) -> str:
    """`Name: value`, folded before spaces so lines stay near 78 characters. Unfolding
    (removing each CRLF) gives the value back exactly."""
    line = f"{name}: "
    lines: list[str] = []
    for index, word in enumerate(value.split(" ")):
        piece = word if index == 0 else " " + word
        if index and len(line) + len(piece) > _FOLD_AT:
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _encoded_words(value: str) -> str:
    """RFC 2047 base64 words of at most 45 UTF-8 bytes, never splitting a character;
    a reader joins adjacent words without the folding whitespace between them."""
    words: list[bytes] = []
    chunk = b""
    for char in value:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(chunk)
            chunk = b""
        chunk += encoded
    words.append(chunk)
    return "\r\n ".join(
        "=?utf-8?b?" + binascii.b2a_base64(word, newline=False).decode("ascii") + "?="
        for word in words
    )


def _text_header(name: str, value: str) -> str:
    if _plain(value):
        return _fold(name, value)
    return f"{name}: {_encoded_words(value)}\r\n"


def _address_header(name: str, address: str) -> str:
    if not address or _PRINTABLE_ASCII.fullmatch(address) is None:
        raise ValueError(f"{name} must be a printable ASCII address, got {address!r}")
    return f"{name}: {address}\r\n"


def _disposition(filename: str) -> str:
    """Content-Disposition with the name quoted, or in RFC 2231 form when not ASCII
    (in continuations when long)."""
    if _PRINTABLE_ASCII.fullmatch(filename) is not None:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        line = f'Content-Disposition: attachment; filename="{quoted}"'
        if len(line) > _FOLD_AT:
            line = line.replace("; ", ";\r\n ", 1)
        return line + "\r\n"
    encoded = urllib.parse.quote(filename, safe="")
    if len(encoded) <= _PARAMETER_PIECE:
        return f"Content-Disposition: attachment; filename*=utf-8''{encoded}\r\n"
    pieces: list[str] = []
    start = 0
    while start < len(encoded):
        end = min(start + _PARAMETER_PIECE, len(encoded))
        percent = encoded.rfind("%", max(end - 2, start), end)
        if end < len(encoded) and percent >= 0:
            end = percent  # never split a %XX triplet
        pieces.append(encoded[start:end])
        start = end
    pieces[0] = "utf-8''" + pieces[0]
    parameters = ";\r\n ".join(f"filename*{index}*={piece}" for index, piece in enumerate(pieces))
    return f"Content-Disposition: attachment;\r\n {parameters}\r\n"


# --- the mail ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardMail:
    """One forwarded mail on the wire: `head` (headers, text part and the attachment's
    headers), the PDF's base64 lines, then `tail` (the closing boundary). Every line
    ends in CRLF; only `head` can hold a line that starts with a dot."""

    sha256: str
    message_id: str
    head: bytes
    content: bytes
    tail: bytes

    def attachment_slices(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The attachment's base64 lines, about `size` bytes at a time."""
        step = max(size // (_LINE + 2), 1) * _LINE_INPUT
        view = memoryview(self.content)
        for start in range(0, len(view), step):
            encoded = binascii.b2a_base64(view[start : start + step], newline=False)
            yield b"\r\n".join(encoded[at : at + _LINE] for at in range(0, len(encoded), _LINE))
            yield b"\r\n"

    def as_bytes(self) -> bytes:
        return b"".join((self.head, *self.attachment_slices(), self.tail))

    def parsed(self) -> EmailMessage:
        """The mail as a receiver reads it (for tests and tools)."""
        message = BytesParser(policy=policy.default).parsebytes(self.as_bytes())
        assert isinstance(message, EmailMessage)  # policy.default makes one
        return message


def build_forward(
    document: Parcel,
    *,
    forward_to: str,
    forward_from: str,
    relay_id: str = DEFAULT_RELAY_ID,
    now: datetime | None = None,
) -> ForwardMail:
    """The mail that forwards one document (README, "Forwarded mail").

    `now` is the Date header (the current time when None). Raises ValueError for a
    `sha256` that is not hexadecimal or an address that cannot be a header.
    """
    message_id = forward_message_id(
        document.sha256,
        document.resend_count,
        destination=document.destination,
        relay_id=relay_id,
    )
    sha256 = document.sha256.lower()
    filename = attachment_filename(document.filename)
    subject = clean_text(document.original_subject, SUBJECT_LIMIT) or f"Invoice {filename}"
    sent_at = now if now is not None else datetime.now(UTC)
    date = format_datetime(sent_at if sent_at.tzinfo is not None else sent_at.replace(tzinfo=UTC))
    # "=" never follows "==" in base64 or quoted-printable: the boundary cannot occur.
    boundary = f"==============={secrets.randbelow(10**19):019d}=="
    # Quoted-printable keeps the whole mail 7-bit: no 8BITMIME needed from the server.
    text = binascii.b2a_qp(_body(document, filename).encode("utf-8"), istext=True)
    head = "".join(
        (
            _address_header("From", forward_from),
            _address_header("To", forward_to),
            _text_header("Subject", subject),
            f"Date: {date}\r\n",
            f"Message-ID: {message_id}\r\n",
            "Auto-Submitted: auto-generated\r\n",
            f"{RELAY_HEADER}: {sha256}\r\n",  # 81 characters: one line is easier to grep
            "MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n',
            "\r\n",
            f"--{boundary}\r\n",
            'Content-Type: text/plain; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "\r\n",
            text.decode("ascii").replace("\n", "\r\n"),
            f"\r\n--{boundary}\r\n",
            "Content-Type: application/pdf\r\n",
            "Content-Transfer-Encoding: base64\r\n",
            _disposition(filename),
            "\r\n",
        )
    )
    return ForwardMail(
        sha256=sha256,
        message_id=message_id,
        head=head.encode("ascii"),
        content=document.content,
        tail=f"--{boundary}--\r\n".encode("ascii"),
    )


def notice_message(notice: Notice) -> EmailMessage:
    """A failure notice as mail: plain text, `Auto-Submitted` so that no autoresponder
    answers it, marked so that the loop guard knows it should it come back."""
    message = EmailMessage()
    message["From"] = notice.sender
    message["To"] = notice.recipient
    message["Subject"] = notice.subject
    message["Date"] = format_datetime(notice.written_at.astimezone(UTC))
    message["Message-ID"] = make_msgid(idstring="notice", domain=notice.sender.rpartition("@")[2])
    message["Auto-Submitted"] = "auto-generated"
    message[NOTICE_HEADER] = f"v1; rows={notice.rows}"
    message.set_content(notice.body)
    return message
