"""Parsers for setting values: each takes the text of one variable and returns the
value or raises ValueError naming the problem, never echoing the value of a secret."""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Callable
from datetime import date
from email.utils import getaddresses
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.models import DEFAULT_GMI_API_URL, GMI_DOCUMENT_TYPES, AfterForward, MailActionMode

_E = TypeVar("_E", bound=enum.Enum)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_LOCAL_PART = re.compile(r"[^\s@<>()\[\],;:\"\\]+")
_DOMAIN = re.compile(r"(?:[\w-]+\.)*[\w-]+")


def enum_of(kind: type[_E]) -> Callable[[str], _E]:
    def parse(text: str) -> _E:
        for member in kind:
            if member.value == text.lower():
                return member
        choices = ", ".join(str(member.value) for member in kind)
        raise ValueError(f"{text!r} is not one of {choices}")

    return parse


def integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"{value} is less than {minimum}")
        return value

    return parse


def port(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = integer(minimum)(text)
        if value > 65535:
            raise ValueError(f"{value} is not a port ({minimum}-65535)")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} must be a number of seconds above zero")
    return value


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO date such as 2026-01-31") from None


def timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r} (use a name such as Europe/Berlin)") from None
    return text


def host(text: str) -> str:
    if any(char.isspace() or not char.isprintable() for char in text) or "/" in text:
        raise ValueError(f"{text!r} is not a host name")
    try:
        # The socket layer encodes names with IDNA; a name it cannot encode ("a..b")
        # would otherwise fail at connect time with a traceback.
        text.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"{text!r} is not a host name") from exc
    return text


def is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at) and bool(_LOCAL_PART.fullmatch(local)) and bool(_DOMAIN.fullmatch(domain))


def address(text: str) -> str:
    """One address, with or without a display name; the bare address is kept."""
    if not text.isprintable():
        raise ValueError("contains control characters")
    pairs = getaddresses([text])
    if len(pairs) != 1 or not is_address(pairs[0][1]):
        raise ValueError(f"{text!r} is not one email address")
    if not pairs[0][1].isascii():
        # SMTP without SMTPUTF8 carries ASCII addresses only; use the domain's
        # punycode form (xn--...) instead.
        raise ValueError(f"{text!r} is not an ASCII address (write the domain as xn--...)")
    return pairs[0][1]


def senders(text: str) -> tuple[str, ...]:
    senders: list[str] = []
    for item in text.split(","):
        entry = item.strip().lower()
        if not entry:
            continue
        valid = (
            _DOMAIN.fullmatch(entry[1:]) is not None if entry.startswith("@") else is_address(entry)
        )
        if not valid:
            raise ValueError(f"{item.strip()!r} is neither an address nor an @domain")
        senders.append(entry)
    return tuple(dict.fromkeys(senders))


def domains(text: str) -> tuple[str, ...]:
    """A comma list of domain names, lower case (a leading "@" is forgiven)."""
    found: list[str] = []
    for item in text.split(","):
        entry = item.strip().lower().removeprefix("@").rstrip(".")
        if not entry:
            continue
        if _DOMAIN.fullmatch(entry) is None or "." not in entry:
            raise ValueError(f"{item.strip()!r} is not a domain name such as mail.example.com")
        found.append(entry)
    return tuple(dict.fromkeys(found))


def authserv_id(text: str) -> str:
    """An Authentication-Results authserv-id: one token, usually the server's host name."""
    if any(char.isspace() or not char.isprintable() for char in text) or any(
        char in text for char in ';()"\\'
    ):
        raise ValueError(f"{text!r} is not an authserv-id such as mx.example.com")
    return text.lower()


def readable_file(text: str) -> Path:
    path = Path(text).resolve()
    if not path.is_file():
        raise ValueError(f"{text} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{text} is not readable")
    return path


def log_format(text: str) -> str:
    lowered = text.lower()
    if lowered not in ("json", "text"):
        raise ValueError(f"{text!r} is not one of json, text")
    return lowered


def pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


def after_forward(text: str) -> AfterForward:
    """`keep`, `seen`, `flag` or `move:FOLDER` (the folder as the server names it,
    case kept, e.g. `move:INBOX/Done`)."""
    name, colon, folder = text.strip().partition(":")
    lowered = name.strip().lower()
    choices = "keep, seen, flag, move:FOLDER"
    if lowered == MailActionMode.MOVE.value:
        if not colon or not folder.strip():
            raise ValueError("move needs a folder: move:FOLDER, e.g. move:Archive")
        if not folder.isprintable():
            raise ValueError("the folder name contains control characters")
        return AfterForward(mode=MailActionMode.MOVE, folder=folder.strip())
    if colon:
        raise ValueError(f"only move takes a folder ({choices})")
    for mode in MailActionMode:
        if mode is not MailActionMode.MOVE and mode.value == lowered:
            return AfterForward(mode=mode)
    raise ValueError(f"{text!r} is not one of {choices}")


def http_url(text: str) -> str:
    """An http(s) base URL, such as INVOICE_RELAY_GMI_API_URL."""
    scheme, separator, rest = text.partition("://")
    if scheme.lower() not in ("http", "https") or not separator or not rest.strip("/"):
        raise ValueError(f"not an http(s) URL such as {DEFAULT_GMI_API_URL}")
    return text.rstrip("/")


def gmi_document_type(text: str) -> str:
    """One of the API's document types (its v3 description lists them in prose)."""
    kind = text.strip().upper()
    if kind not in GMI_DOCUMENT_TYPES:
        raise ValueError(f"not a GetMyInvoices document type ({', '.join(GMI_DOCUMENT_TYPES)})")
    return kind


def tags(text: str) -> tuple[str, ...]:
    """A comma list of tags; empty items dropped."""
    return tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
