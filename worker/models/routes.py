"""Values of routes and destinations: a route's last poll as the database keeps it,
what a purge deleted, and the default name of an SMTP destination. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


def smtp_destination(forward_to: str) -> str:
    """A route's destination when it names none and forwards by mail: the address in
    lower case, so that two spellings of one inbox share their documents."""
    return f"smtp:{forward_to.strip().lower()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePollState:
    """A route's last poll by any replica (`route_polls`): health reads its last success,
    so a replica that keeps losing fire-time claims to others is not unhealthy."""

    route: str
    last_started_at: datetime
    last_finished_at: datetime
    last_success_at: datetime | None  # None until a poll of it succeeded
    last_result: str  # the last poll's summary, e.g. "3 mails read, 1 forwarded"
    last_error: str | None  # why the last poll failed; None when it succeeded
    owner: str  # the replica (its lease token) that ran the last poll

    @property
    def ok(self) -> bool:
        return self.last_error is None


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeCounts:
    """What `purge` deleted for one mailbox folder."""

    sightings: int = 0
    documents: int = 0
    # Documents the folder introduced that another folder's sightings still name as
    # duplicates: kept (with their bytes and state) and handed to the oldest of those.
    documents_kept: int = 0
    mail_actions: int = 0
    positions: int = 0  # the folder's poll position (0 or 1)

    def describe(self) -> str:
        kept = (
            f", {self.documents_kept} kept for the other mailboxes that saw them"
            if self.documents_kept
            else ""
        )
        return f"deleted {self.sightings} sighting(s) and {self.documents} document(s){kept}"
