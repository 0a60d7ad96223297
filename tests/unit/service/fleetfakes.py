"""Fakes for the many-route service, passed in through constructors: the fire-claim
table and route poll records of the database, a clock that moves only when a test says
so, and a poll that blocks until a test lets it go."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.errors import StoreError
from worker.models import PollReport, RoutePollState

WAIT = 10.0  # a bound on waits for a condition, so a broken fleet fails instead of hanging


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimAttempt:
    route: str
    fire_time: datetime
    owner: str
    won: bool


class FakeFireStore:
    """One claim table, shared by every fleet given it (like replicas on one database)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.claims: dict[tuple[str, datetime], str] = {}
        self.claimed_at: dict[tuple[str, datetime], datetime] = {}
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)  # the database's clock
        self.attempts: list[ClaimAttempt] = []
        self.forgotten: list[float] = []  # the ages asked for
        self.records: list[dict[str, object]] = []
        self.states: dict[str, RoutePollState] = {}
        self.unavailable = False
        self.refused = 0  # calls refused while unavailable

    def _check(self) -> None:
        # Called with the condition held.
        if self.unavailable:
            self.refused += 1
            self._changed.notify_all()
            raise StoreError("connection refused")

    def claim_fire(self, route: str, fire_time: datetime, owner: str) -> bool:
        with self._changed:
            self._check()
            won = (route, fire_time) not in self.claims
            if won:
                self.claims[route, fire_time] = owner
                self.claimed_at[route, fire_time] = self.now()
            self.attempts.append(
                ClaimAttempt(route=route, fire_time=fire_time, owner=owner, won=won)
            )
            self._changed.notify_all()
            return won

    def forget_claims_older_than(self, seconds: float) -> int:
        with self._changed:
            self._check()
            moment = self.now() - timedelta(seconds=seconds)
            old = [key for key, at in self.claimed_at.items() if at < moment]
            for key in old:
                del self.claims[key]
                del self.claimed_at[key]
            self.forgotten.append(seconds)
            self._changed.notify_all()
            return len(old)

    def record_route_poll(
        self,
        route: str,
        *,
        started_at: datetime,
        finished_at: datetime,
        ok: bool,
        summary: str,
        error: str | None,
        owner: str,
    ) -> None:
        with self._changed:
            self._check()
            self.records.append(
                {"route": route, "ok": ok, "summary": summary, "error": error, "owner": owner}
            )
            previous = self.states.get(route)
            self.states[route] = RoutePollState(
                route=route,
                last_started_at=started_at,
                last_finished_at=finished_at,
                last_success_at=finished_at
                if ok
                else (previous.last_success_at if previous else None),
                last_result=summary,
                last_error=error,
                owner=owner,
            )
            self._changed.notify_all()

    def route_polls(self) -> dict[str, RoutePollState]:
        with self._changed:
            self._check()
            return dict(self.states)

    def wait_for(self, condition: Callable[[FakeFireStore], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: condition(self), WAIT), "timed out"

    def won(self) -> list[ClaimAttempt]:
        with self._changed:
            return [attempt for attempt in self.attempts if attempt.won]


class FakeClock:
    """Time stands still until `advance`; the fleet's timer waits on it for real."""

    def __init__(self, start: datetime) -> None:
        self._changed = threading.Condition()
        self._now = start
        self._sleepers: list[tuple[threading.Event, datetime]] = []

    def now(self) -> datetime:
        with self._changed:
            return self._now

    def wait(self, wake: threading.Event, until: datetime) -> None:
        with self._changed:
            if self._now >= until:
                return
            entry = (wake, until)
            self._sleepers.append(entry)
            self._changed.notify_all()
        try:
            wake.wait()  # set by `advance` once `until` has come, or by the fleet's stop
        finally:
            with self._changed:
                self._sleepers.remove(entry)
                self._changed.notify_all()

    def advance(self, delta: timedelta) -> None:
        with self._changed:
            self._now += delta
            for wake, until in self._sleepers:
                if until <= self._now:
                    wake.set()

    def wait_for_sleeper(self) -> datetime:
        """Wait until the timer has dealt with everything due and sleeps; its wake-up."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(until > self._now for _, until in self._sleepers), WAIT
            ), "the timer never went back to sleep"
            return min(until for _, until in self._sleepers)


@dataclass
class BlockingPoll:
    """A poll that counts how many run at once and blocks until a test lets it end:
    `allow(n)` lets n more polls end, `open()` every poll from now on."""

    started_at: datetime
    opened: bool = False
    permits: int = 0
    calls: list[tuple[str, datetime]] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    failures: dict[str, Exception] = field(default_factory=dict)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, route: str, fire_time: datetime) -> PollReport:
        with self._changed:
            self.calls.append((route, fire_time))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self._changed.notify_all()
        try:
            with self._changed:
                self._changed.wait_for(lambda: self.opened or self.permits > 0)
                if not self.opened:
                    self.permits -= 1
            failure = self.failures.get(route)
            if failure is not None:
                raise failure
            return PollReport(
                mailbox=f"{route}@example.org/INBOX",
                started_at=self.started_at,
                finished_at=self.started_at + timedelta(seconds=1),
                mails_seen=2,
                forwarded=1,
                pending=3,
                failed_total=1,
            )
        finally:
            with self._changed:
                self.running -= 1
                self._changed.notify_all()

    def allow(self, polls: int) -> None:
        with self._changed:
            self.permits += polls
            self._changed.notify_all()

    def open(self) -> None:
        with self._changed:
            self.opened = True
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[BlockingPoll], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: condition(self), WAIT), "timed out"

    def routes_called(self) -> list[str]:
        with self._changed:
            return [route for route, _ in self.calls]
