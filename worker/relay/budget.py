"""The API's budgets: calls a minute, calls a day, uploads an hour, per destination.

Kept in the database (`worker.store.budgets`) so that every route and replica sharing
a GetMyInvoices account spends from one budget. The decision is pure (`decide`): the
store hands it the counts of the current windows inside one locked transaction, and
records the spending only when it says yes. A limit the API reported itself (403/429,
105, 503) is recorded as a hold that every sharer obeys until it ends.

Windows and holds are stamped with the database's clock (`BudgetStore.database_now`),
the one every replica shares: two replicas whose clocks disagree still spend from one
minute's window, and wait for one hold.

What counts: every call in the calls-a-minute and calls-a-day windows (`GET /account`
too, counted once it has answered, since its answer names the destination), and only
`POST /documents` in the uploads-an-hour window.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from worker.models import (
    DEFAULT_GMI_CALLS_PER_DAY,
    DEFAULT_GMI_CALLS_PER_MINUTE,
    GMI_UPLOADS_PER_HOUR,
)


class Window(enum.Enum):
    """A fixed window of the clock and what it counts; the value is stored."""

    MINUTE = "calls_minute"
    DAY = "calls_day"
    UPLOAD_HOUR = "uploads_hour"


# What each window's limit is called in a document's reason.
LIMIT_NAMES = {
    Window.MINUTE: "the API's calls-per-minute limit",
    Window.DAY: "the API's calls-per-day limit",
    Window.UPLOAD_HOUR: "the API's hourly upload limit",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    calls_per_minute: int = DEFAULT_GMI_CALLS_PER_MINUTE
    calls_per_day: int = DEFAULT_GMI_CALLS_PER_DAY
    uploads_per_hour: int = GMI_UPLOADS_PER_HOUR

    def limit(self, window: Window) -> int:
        return {
            Window.MINUTE: self.calls_per_minute,
            Window.DAY: self.calls_per_day,
            Window.UPLOAD_HOUR: self.uploads_per_hour,
        }[window]


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """No call at `since`: `limit` allows the next one at `until` (the database's clock)."""

    limit: str
    until: datetime
    since: datetime

    @property
    def seconds(self) -> float:
        """How long to wait, measured on one clock (not this host's against the database's)."""
        return max(0.0, (self.until - self.since).total_seconds())


def window_starts(now: datetime, *, upload: bool) -> dict[Window, datetime]:
    """The start of each window a call at `now` spends from (UTC, fixed windows)."""
    minute = now.replace(second=0, microsecond=0)
    starts = {Window.MINUTE: minute, Window.DAY: minute.replace(hour=0, minute=0)}
    if upload:
        starts[Window.UPLOAD_HOUR] = minute.replace(minute=0)
    return starts


_LENGTHS = {
    Window.MINUTE: timedelta(minutes=1),
    Window.DAY: timedelta(days=1),
    Window.UPLOAD_HOUR: timedelta(hours=1),
}


def decide(
    budget: Budget,
    *,
    now: datetime,
    used: Mapping[Window, int],
    starts: Mapping[Window, datetime],
    held_until: datetime | None,
    held_for: str = "",
) -> Hold | None:
    """None: the call may go (the caller counts it in every window of `starts`); else
    the hold that ends latest among the exhausted windows and a hold the API asked for.
    `used` holds the counts of the windows `starts` names (absent: none used)."""
    holds: list[Hold] = []
    if held_until is not None and held_until > now:
        holds.append(Hold(limit=held_for or "the API's limit", until=held_until, since=now))
    for window, start in starts.items():
        if used.get(window, 0) >= budget.limit(window):
            until = start + _LENGTHS[window]
            holds.append(Hold(limit=LIMIT_NAMES[window], until=until, since=now))
    return max(holds, key=lambda hold: hold.until) if holds else None


class BudgetStore(Protocol):
    """What the budgets need from the database. Raises `worker.errors.StoreError`."""

    def spend_budget(
        self,
        destination: str,
        *,
        starts: Mapping[str, datetime],
        allow: Callable[[Mapping[str, int], datetime | None, str], bool],
    ) -> bool:
        """In one transaction that excludes every other spender of `destination`: the
        counts of the windows named by `starts` (a window begun anew counts 0; one a
        sharer already began later is counted in instead) and the hold, given to
        `allow`; when it answers True, add one to each window."""

    def hold_budget(self, destination: str, *, until: datetime, limit: str) -> None:
        """Every spender of `destination` waits until `until` (a later hold stays)."""

    def database_now(self) -> datetime:
        """The database's clock: the one every replica's windows and holds are on."""


class SharedBudget:
    """The budgets of API destinations, spent through the database: what
    `worker.delivery.getmyinvoices.CallBudget` asks for.

    `clock` is the database's (`store.database_now`) unless a test stands in for it;
    never a replica's own, which another replica's may contradict.
    """

    def __init__(
        self,
        *,
        store: BudgetStore,
        budget: Budget,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._budget = budget
        self._clock = clock or store.database_now

    def spend(self, destination: str, *, upload: bool) -> Hold | None:
        """Spend one call (and one upload); a `Hold` instead when a limit is reached."""
        return self._spend(destination, upload=upload, made=False)

    def count(self, destination: str) -> None:
        """A call already made (`GET /account`, which names the destination only in its
        answer): counted in the calls-a-minute and calls-a-day windows, whatever they
        hold, and not as an upload."""
        self._spend(destination, upload=False, made=True)

    def _spend(self, destination: str, *, upload: bool, made: bool) -> Hold | None:
        now = self._clock()
        starts = window_starts(now, upload=upload)
        verdict: list[Hold | None] = [None]

        def allow(used: Mapping[str, int], held_until: datetime | None, held_for: str) -> bool:
            if made:
                return True
            verdict[0] = decide(
                self._budget,
                now=now,
                used={window: used.get(window.value, 0) for window in starts},
                starts=starts,
                held_until=held_until,
                held_for=held_for,
            )
            return verdict[0] is None

        self._store.spend_budget(
            destination,
            starts={window.value: start for window, start in starts.items()},
            allow=allow,
        )
        return verdict[0]

    def hold(self, destination: str, *, seconds: float, limit: str) -> datetime:
        """The API reported `limit`: nobody calls it for `seconds`; returns until when."""
        until = self._clock() + timedelta(seconds=seconds)
        self._store.hold_budget(destination, until=until, limit=limit)
        return until
