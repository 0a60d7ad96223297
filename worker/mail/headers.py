"""Pure header decisions: a raw header block to the few values the relay reads.

Nothing here does I/O. Every value that leaves this module went through
`worker.mail.text.clean_text`: control characters (CR, LF, NUL and the rest of C0/C1)
and bidi controls are gone, each run of whitespace is one space, and the length is capped.
That holds for encoded words too: `=?utf-8?q?a=0D=0ABcc:_x?=` decodes to a CR LF,
which then becomes a space like a raw one. So no text copied from an incoming mail can
start a header of its own in a forwarded one.
"""

from __future__ import annotations

import codecs
import email.errors
from datetime import UTC, datetime
from email import policy
from email.header import decode_header
from email.headerregistry import AddressHeader, BaseHeader
from email.message import Message
from email.parser import Parser
from email.utils import parsedate_to_datetime

from worker.mail.text import clean_text
from worker.models import MailHeaders

SUBJECT_MAX_CHARS = 998
HEADER_MAX_CHARS = 500
AUTH_RESULTS_MAX_CHARS = 4000  # one Authentication-Results header; Gmail's run to ~1000
AUTH_RESULTS_MAX_COUNT = 20  # a mail carries a handful; more are ignored

# What the standard library's header parsing raises on hostile input.
HEADER_PARSE_ERRORS = (
    ValueError,
    IndexError,
    TypeError,
    AttributeError,
    LookupError,
    email.errors.MessageError,
)


# --- decoding helpers (shared with worker.mail.mime for filenames) ----------------------------


def decode_octets(octets: bytes, charset: str | None) -> str:
    """`octets` in `charset`, falling back to UTF-8 with replacement; never raises."""
    try:
        codecs.lookup(charset or "utf-8")
        return octets.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError, TypeError):
        # unknown charset, or a codec that is not a text encoding ("base64", "rot13")
        return octets.decode("utf-8", "replace")


def decode_encoded_words(value: str) -> str:
    """RFC 2047 words in `value` decoded; the value itself when they cannot be."""
    if "=?" not in value:
        return value
    try:
        pieces = decode_header(value)
    except HEADER_PARSE_ERRORS:
        return value
    return "".join(
        piece if isinstance(piece, str) else decode_octets(piece, charset)
        for piece, charset in pieces
    )


# --- the header block ---------------------------------------------------------------------


def parse_headers(raw: bytes) -> MailHeaders:
    """The headers the relay reads, from a raw header block; never raises.

    8-bit header bytes are read as UTF-8, or Latin-1 when they are not valid UTF-8.
    `sender_address` is set only when From holds exactly one well-formed address and
    the parser found no defect; otherwise `sender_defect` says why. Every
    Authentication-Results header is kept raw (unfolded, cleaned, in mail order) for
    `worker.mail.trust` to parse.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # NUL, bare CR and other controls inside a line survive parsing: clean_text removes them.
    message = Parser(policy=policy.default).parsestr(text, headersonly=True)
    sender, sender_address, sender_defect = _sender(message)
    return MailHeaders(
        message_id=_header_text(message, "Message-ID", HEADER_MAX_CHARS),
        sender=sender,
        sender_address=sender_address,
        sender_defect=sender_defect,
        subject=_header_text(message, "Subject", SUBJECT_MAX_CHARS),
        date=_date(message),
        auto_submitted=_raw_header(message, "Auto-Submitted"),
        relay_marker=_raw_header(message, "X-Invoice-Relay"),
        notice_marker=_raw_header(message, "X-Invoice-Relay-Notice"),
        authentication_results=_all_raw(
            message, "Authentication-Results", AUTH_RESULTS_MAX_CHARS, AUTH_RESULTS_MAX_COUNT
        ),
    )


def _first_raw(message: Message, name: str) -> str | None:
    for key, value in message.raw_items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _all_raw(message: Message, name: str, limit: int, count: int) -> tuple[str, ...]:
    found = [
        clean_text(str(value), limit)
        for key, value in message.raw_items()
        if key.lower() == name.lower()
    ]
    return tuple(found[:count])


def _header_text(message: Message, name: str, limit: int) -> str:
    raw = _first_raw(message, name)
    if raw is None:
        return ""
    try:
        decoded = str(message[name])
    except HEADER_PARSE_ERRORS:
        decoded = raw
    return clean_text(decoded, limit)


def _raw_header(message: Message, name: str) -> str | None:
    raw = _first_raw(message, name)
    return None if raw is None else clean_text(raw, HEADER_MAX_CHARS)


def _sender(message: Message) -> tuple[str, str, str | None]:
    raw_values = [value for key, value in message.raw_items() if key.lower() == "from"]
    if not raw_values:
        return "", "", "no From header"
    # When From cannot be trusted, show what it claimed rather than the parser's remains.
    display = clean_text(decode_encoded_words(str(raw_values[0])), HEADER_MAX_CHARS)
    try:
        header = message["From"]
        if len(raw_values) > 1:
            return display, "", "several From headers"
        if not isinstance(header, AddressHeader):
            return display, "", "From is not an address header"
        defects = header.defects if isinstance(header, BaseHeader) else ()
        if defects:
            return display, "", f"malformed From: {clean_text(str(defects[0]), 100)}"
        addresses = header.addresses
        if len(addresses) != 1:
            reason = "several From addresses" if addresses else "From has no address"
            return display, "", reason
        address = addresses[0]
        if not address.username or not address.domain:
            return display, "", "From address lacks a user or domain"
        addr_spec = address.addr_spec
        parsed_display = clean_text(str(header), HEADER_MAX_CHARS)
    except HEADER_PARSE_ERRORS as exc:
        return display, "", f"unparseable From: {type(exc).__name__}"
    cleaned = clean_text(addr_spec, HEADER_MAX_CHARS).lower()
    if cleaned != addr_spec.lower() or " " in cleaned:
        return display, "", "From address contains control characters or spaces"
    return parsed_display, cleaned, None


def _date(message: Message) -> datetime | None:
    raw = _first_raw(message, "Date")
    if raw is None:
        return None
    try:
        parsed = parsedate_to_datetime(clean_text(raw, HEADER_MAX_CHARS))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    # RFC 5322 "-0000" (local time unknown) gives a naive value; read it as UTC.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
