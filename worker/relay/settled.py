"""Pure: whether a mail is settled, so that INVOICE_RELAY_AFTER_FORWARD may act on it,
and whether the server can move mail at all."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from worker.models import DocumentState, PartState, SightingKind


class Settlement(enum.Enum):
    SETTLED = "settled"  # every sighting is done with, and one carried an accepted PDF
    UNSETTLED = "unsettled"  # something may still change: pending, failed, error
    NOTHING_ACCEPTED = "nothing_accepted"  # done with, but no accepted PDF: left alone


class MoveSupport(enum.Enum):
    MOVE = "move"  # UID MOVE (RFC 6851)
    COPY_EXPUNGE = "copy_expunge"  # UID COPY, \Deleted, UID EXPUNGE (UIDPLUS, RFC 4315)
    NONE = "none"  # neither: a move would need a plain EXPUNGE, which is never sent


def _accepted(part: PartState) -> bool:
    """A document that was forwarded, or a duplicate of one."""
    return (
        part.kind in (SightingKind.DOCUMENT, SightingKind.DUPLICATE)
        and part.document_state is DocumentState.FORWARDED
    )


def settlement(parts: Sequence[PartState]) -> Settlement:
    """Settled when every sighting is a forwarded document, a duplicate of a forwarded
    document, `rejected` or `no_pdf`, and at least one is of the first two kinds. A
    failed document may be retried by a person (`invoice-relay retry`) and a duplicate
    of a pending one may yet fail: the mail stays as it is until then."""
    finished = all(
        _accepted(part) or part.kind in (SightingKind.REJECTED, SightingKind.NO_PDF)
        for part in parts
    )
    if not finished:
        return Settlement.UNSETTLED
    if not any(_accepted(part) for part in parts):
        return Settlement.NOTHING_ACCEPTED
    return Settlement.SETTLED


def move_support(capabilities: frozenset[str]) -> MoveSupport:
    """How to move with these (upper-case) capabilities; MOVE first."""
    if "MOVE" in capabilities:
        return MoveSupport.MOVE
    if "UIDPLUS" in capabilities:
        return MoveSupport.COPY_EXPUNGE
    return MoveSupport.NONE


def move_problem(support: MoveSupport, *, folder: str, folder_exists: bool) -> str | None:
    """Why INVOICE_RELAY_AFTER_FORWARD=move:FOLDER cannot work here; None when it can."""
    if support is MoveSupport.NONE:
        return (
            "the IMAP server offers neither MOVE nor UIDPLUS, so mail cannot be moved "
            "without expunging other deleted mail (use seen, flag or keep)"
        )
    if not folder_exists:
        return f"the folder {folder!r} does not exist (create it; the relay does not)"
    return None


def searchable_message_id(message_id: str) -> bool:
    """Whether a (stranger-written) Message-ID can be sent in a SEARCH HEADER as it is:
    printable ASCII without quotes or backslashes, and not empty."""
    return bool(message_id) and all(" " < char <= "~" and char not in '"\\' for char in message_id)
