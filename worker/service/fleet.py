"""Polling many routes with a constant number of threads.

One timer thread keeps a heap of (next fire time, route) and hands each due fire to a
queue ordered by fire time; `max_parallel_polls` worker threads take fires from it. A
worker first claims (route, fire time) in the database: the replica that wins polls,
every other logs `poll_skipped`. So with several replicas each route is polled once per
fire time, by whichever replica had a worker free first. Threads, and the memory kept
per route, do not grow with the number of routes: a thousand idle routes cost a heap
entry and a few fields each.

At start-up each route's latest past fire time is due at once: a restarted replica
polls every route unless a peer already did that fire time. A route whose poll is still
queued or running when its next fire time comes is not queued twice (`poll_overlap`);
that fire time is left to the peers. After a suspend, only the latest missed fire time
of a route is polled, not every one. What a worker does with one fire (claim, poll,
record) is `worker.service.routepoll`; the fire times are `worker.service.fires`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker.config.schedule import ScheduleSpec
from worker.errors import InfrastructureError
from worker.service.fires import latest_fire, next_fire, route_offset
from worker.service.metrics import RelayMetrics
from worker.service.ports import FireClaims
from worker.service.routepoll import FireJob, Poll, RouteOutcome, RoutePoller

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL_POLLS = 8
CLAIM_RETENTION = timedelta(days=1)  # claims of older fire times are deleted
FORGET_EVERY = timedelta(hours=1)
# The timer waits on the monotonic clock for a wall-clock moment; re-reading the wall
# clock this often bounds how late a fire is after the clock was set back or forward.
_MAX_TIMER_WAIT = 30.0


class Clock(Protocol):
    """Wall-clock time for fire times, and a wait until one of them."""

    def now(self) -> datetime: ...

    def wait(self, wake: threading.Event, until: datetime) -> None:
        """Return at `until` by this clock, or sooner once `wake` is set."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, wake: threading.Event, until: datetime) -> None:
        seconds = (until - self.now()).total_seconds()
        wake.wait(min(max(seconds, 0.0), _MAX_TIMER_WAIT))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSchedule:
    """One route as the scheduler sees it."""

    name: str
    spec: ScheduleSpec


@dataclass(slots=True)
class _RouteState:
    spec: ScheduleSpec
    offset: timedelta
    next_fire_at: datetime | None = None
    queued: bool = False
    running: bool = False
    again: bool = False  # poll_now() came while the route's poll ran


class Fleet:
    """Polls every route on its schedule until `stop`; see the module's docstring.

    `poll(route, fire_time)` runs one poll of one route; it should end soon after the
    service's stop event is set. `owner` is this replica's lease token, written with
    every claim and poll record.
    """

    def __init__(
        self,
        *,
        routes: Sequence[RouteSchedule],
        poll: Poll,
        claims: FireClaims,
        owner: str,
        max_parallel_polls: int = DEFAULT_MAX_PARALLEL_POLLS,
        metrics: RelayMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        if max_parallel_polls < 1:
            raise ValueError(f"max_parallel_polls must be at least 1, not {max_parallel_polls}")
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError("route names must be unique")
        self._claims = claims
        self._parallel = max_parallel_polls
        self.metrics = metrics if metrics is not None else RelayMetrics(routes=names)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._poller = RoutePoller(
            routes=names,
            poll=poll,
            claims=claims,
            owner=owner,
            metrics=self.metrics,
            now=self._clock.now,
        )
        self._states = {
            route.name: _RouteState(spec=route.spec, offset=route_offset(route.name, route.spec))
            for route in routes
        }
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the ready queue, or stopping
        self._idle = threading.Condition(self._lock)  # a poll ended
        self._ready: list[tuple[datetime, int, FireJob]] = []
        self._order = itertools.count()  # ties in the heaps go first come, first served
        self._running = 0
        self._stopping = False
        self._timer_wake = threading.Event()
        self._timers: list[tuple[datetime, int, str]] = []  # the timer thread's alone
        self._forgot_at: datetime | None = None
        self._threads: list[threading.Thread] = []
        self._started = threading.Event()  # every thread was started

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Queue each route's latest past fire time and start the threads."""
        if self._threads:
            raise RuntimeError("the fleet has already been started")
        now = self._clock.now()
        for name, state in self._states.items():
            first = latest_fire(state.spec, now, state.offset)
            if first is None:
                first = next_fire(state.spec, now, state.offset)
            self._timers.append((first, next(self._order), name))
            state.next_fire_at = first
        heapq.heapify(self._timers)
        self._threads.append(
            threading.Thread(target=self._timer_loop, name="invoice-relay-timer", daemon=True)
        )
        self._threads.extend(
            # Daemons: a poll stuck on a dead server must not hold the process at exit.
            threading.Thread(
                target=self._worker_loop, name=f"invoice-relay-poll-{index}", daemon=True
            )
            for index in range(self._parallel)
        )
        for thread in self._threads:
            thread.start()
        self._started.set()
        _LOG.info(
            "polling %d routes, at most %d at once",
            len(self._states),
            self._parallel,
            extra={"action": "fleet_started"},
        )

    def stop(self, timeout: float) -> bool:
        """Start no more polls and wait up to `timeout` seconds for the running ones;
        True when none is left running. Queued fire times are dropped unclaimed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            self._ready.clear()
            for state in self._states.values():
                state.queued = state.again = False
            self._work.notify_all()
        self._timer_wake.set()
        if self._threads:
            self._threads[0].join(max(deadline - time.monotonic(), 0.0))
        with self._idle:
            finished = self._idle.wait_for(
                lambda: self._running == 0, timeout=max(deadline - time.monotonic(), 0.0)
            )
        if not finished:
            _LOG.warning(
                "%d polls did not finish within %.0f s; exiting without them "
                "(their mail stays in the mailbox and is picked up next time)",
                self._running,
                timeout,
                extra={"action": "poll_abandoned"},
            )
        return finished

    def alive(self) -> bool:
        """The timer and every worker thread run (false until `start` has returned, and
        once stopping)."""
        if self._is_stopping() or not self._started.is_set():
            return False
        return all(thread.is_alive() for thread in self._threads)

    # --- what the endpoints and IDLE ask -------------------------------------------------

    @property
    def routes(self) -> tuple[str, ...]:
        return tuple(self._states)

    def snapshot(self) -> dict[str, RouteOutcome]:
        """Every route's outcome on this replica, by name."""
        outcomes = self._poller.outcomes()
        with self._lock:
            return {
                name: replace(
                    outcomes[name], next_fire_at=state.next_fire_at, running=state.running
                )
                for name, state in self._states.items()
            }

    def polls_running(self) -> int:
        with self._lock:
            return self._running

    def polls_waiting(self) -> int:
        """Polls due and waiting for a free worker."""
        with self._lock:
            return len(self._ready)

    def poll_now(self, route: str) -> None:
        """Poll `route` as soon as a worker is free, without a claim (IMAP IDLE
        announced mail; the route's poll lease keeps it to one replica). While the
        route's poll runs: once more after it. Ignored once stopping."""
        with self._lock:
            state = self._states.get(route)
            if state is None:
                raise KeyError(f"unknown route {route!r}")
            if self._stopping or state.queued:
                return
            if state.running:
                state.again = True
                return
            self._queue(route, state, self._clock.now(), scheduled=False)

    # --- the timer -----------------------------------------------------------------------

    def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            if self._is_stopping():
                return
            now = self._clock.now()
            self._forget_old_claims(now)
            if not self._timers:  # no routes: nothing to wait for but the stop
                self._timer_wake.wait()
                continue
            while self._timers[0][0] <= now:
                self._fire(now)
            self._clock.wait(self._timer_wake, self._timers[0][0])

    def _fire(self, now: datetime) -> None:
        fire_time, _, name = heapq.heappop(self._timers)
        state = self._states[name]
        following = next_fire(state.spec, fire_time, state.offset)
        if following <= now:  # fire times were missed: only the latest one counts
            fire_time = latest_fire(state.spec, now, state.offset) or fire_time
            following = next_fire(state.spec, fire_time, state.offset)
        heapq.heappush(self._timers, (following, next(self._order), name))
        with self._lock:
            state.next_fire_at = following
            if self._stopping:
                return
            if state.queued or state.running:
                _LOG.info(
                    "route %s: the previous poll is still %s; fire time %s left to others",
                    name,
                    "running" if state.running else "waiting for a free worker",
                    fire_time.isoformat(),
                    extra={
                        "action": "poll_overlap",
                        "route": name,
                        "fire_time": fire_time.isoformat(),
                    },
                )
                return
            self._queue(name, state, fire_time, scheduled=True)

    def _queue(self, route: str, state: _RouteState, at: datetime, *, scheduled: bool) -> None:
        # Called with the lock held.
        state.queued = True
        job = FireJob(route=route, fire_time=at, scheduled=scheduled)
        heapq.heappush(self._ready, (at, next(self._order), job))
        self._work.notify()

    def _forget_old_claims(self, now: datetime) -> None:
        if self._forgot_at is not None and now - self._forgot_at < FORGET_EVERY:
            return
        self._forgot_at = now
        try:
            removed = self._claims.forget_claims_older_than(CLAIM_RETENTION.total_seconds())
        except InfrastructureError as exc:
            _LOG.warning(
                "could not delete old fire claims: %s", exc, extra={"action": "claims_kept"}
            )
            return
        _LOG.debug("deleted %d old fire claims", removed, extra={"action": "claims_deleted"})

    # --- the workers ---------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._stopping or bool(self._ready))
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._ready)
                state = self._states[job.route]
                state.queued = False
                state.running = True
                self._running += 1
            try:
                self._poller.run(job, stopping=self._is_stopping)
            finally:
                with self._lock:
                    state.running = False
                    self._running -= 1
                    if state.again and not self._stopping:
                        state.again = False
                        self._queue(job.route, state, self._clock.now(), scheduled=False)
                    self._idle.notify_all()

    def _is_stopping(self) -> bool:
        with self._lock:
            return self._stopping
