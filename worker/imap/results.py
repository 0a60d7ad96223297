"""imapclient's untyped FETCH results turned into `worker.models` values at once."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from worker.mail import headers, mime
from worker.models import MailSummary

logger = logging.getLogger(__name__)

HEADER_FIELDS = (
    "FROM",
    "SUBJECT",
    "DATE",
    "MESSAGE-ID",
    "AUTO-SUBMITTED",
    "X-INVOICE-RELAY",
    "X-INVOICE-RELAY-NOTICE",
    "AUTHENTICATION-RESULTS",  # every one of them, in mail order (worker.mail.trust)
)
_HEADER_ITEM = "BODY.PEEK[HEADER.FIELDS (" + " ".join(HEADER_FIELDS) + ")]"
SUMMARY_ITEMS = ("UID", "RFC822.SIZE", "INTERNALDATE", "BODYSTRUCTURE", _HEADER_ITEM)
# What the server answers for BODY.PEEK[<section>] and BODY.PEEK[<section>]<offset.n>.
_SECTION_KEY = re.compile(rb"^BODY\[([^\]]*)\](?:<\d+>)?$")


def section_of(key: object) -> str | None:
    if not isinstance(key, bytes):
        return None
    match = _SECTION_KEY.match(key.upper())
    return match.group(1).decode("ascii") if match else None


def summary_of(uid: int, data: Mapping[bytes, Any]) -> MailSummary:
    header_bytes = b""
    for key, value in data.items():
        if key.upper().startswith(b"BODY[HEADER.FIELDS") and isinstance(value, bytes):
            header_bytes = value
    internaldate = data.get(b"INTERNALDATE")
    if isinstance(internaldate, datetime):
        internaldate = (
            internaldate.astimezone(UTC)
            if internaldate.tzinfo
            else internaldate.replace(tzinfo=UTC)
        )
    else:
        internaldate = None
    raw_structure = data.get(b"BODYSTRUCTURE")
    structure_problem: str | None = None
    try:
        structure = mime.parse_bodystructure(raw_structure) if raw_structure else None
    except ValueError as exc:
        logger.warning(
            "unreadable BODYSTRUCTURE",
            extra={"action": "bodystructure_unreadable", "uid": uid},
            exc_info=True,
        )
        structure = None
        structure_problem = str(exc)
    return MailSummary(
        structure_problem=structure_problem,
        uid=uid,
        size=int(data[b"RFC822.SIZE"]),
        internaldate=internaldate,
        headers=headers.parse_headers(header_bytes),
        structure=structure,
    )
