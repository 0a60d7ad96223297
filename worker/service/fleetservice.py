"""`run` for many routes: the `Fleet` scheduler, the probes and metrics over HTTP, and
signals, until the stop event is set.

`/healthz` judges each route by its latest successful poll by any replica, read from
the database at each request; it answers 503 only when this process cannot work (the
database unreachable, the scheduler dead, no route healthy), else 200 with the
unhealthy routes listed. `/healthz?route=NAME` judges one route (404 for a name not
served).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from worker.errors import InfrastructureError
from worker.models import RoutePollState
from worker.service.fleet import Fleet
from worker.service.health import (
    HealthServer,
    HealthVerdict,
    UnknownRoute,
    describe_error,
    judge_process,
    judge_route,
    process_body,
    route_body,
)
from worker.service.ports import RoutePolls
from worker.service.runner import SideServer
from worker.service.signals import HANDLED_SIGNALS

_LOG = logging.getLogger(__name__)

# Fleet.stop waits this long for running polls; the watchdog of
# worker.service.shutdown ends the process 8.5 s after the stop, within the promised 10.
DEFAULT_SHUTDOWN_SECONDS = 8.0
_SIGNAL_CHECK_SECONDS = 0.5  # the main thread must run Python code to take a signal


def _utc_now() -> datetime:
    return datetime.now(UTC)


class FleetService:
    """Runs `fleet` and serves its health and metrics until `stop_event` is set.

    `healthy_after` gives each route's window (seconds) for `/healthz`; `polls` reads
    every replica's latest poll per route from the database. `http_port` 0 turns HTTP
    off.
    """

    def __init__(
        self,
        *,
        fleet: Fleet,
        polls: RoutePolls,
        healthy_after: Mapping[str, float],
        http_port: int,
        stop_event: threading.Event,
        http_host: str = "0.0.0.0",  # noqa: S104 - a container's port is published on purpose
        shutdown_timeout: float = DEFAULT_SHUTDOWN_SECONDS,
        side_servers: tuple[SideServer, ...] = (),
        clock: Callable[[], datetime] = _utc_now,
        orphans: Callable[[], list[tuple[str, int]]] | None = None,
    ) -> None:
        if not 0 <= http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535, not {http_port}")
        missing = sorted(set(fleet.routes) - set(healthy_after))
        if missing:
            raise ValueError(f"no health window for routes: {', '.join(missing)}")
        self.fleet = fleet
        self._polls = polls
        self._healthy_after = dict(healthy_after)
        self._http_port = http_port
        self._http_host = http_host
        self._stop_event = stop_event
        self._shutdown_timeout = shutdown_timeout
        self._side_servers = side_servers
        self._clock = clock
        # Destinations with pending documents whose mailbox no route polls any more.
        self._orphans = orphans
        self._running_since = clock()
        self._server: HealthServer | None = None
        self._signal: int | None = None
        self.started = threading.Event()  # set once `run` serves HTTP and polls

    # --- what the endpoints ask ----------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        if self._stop_event.is_set():
            return False, "stopping"
        if not self.fleet.alive():
            return False, "scheduler not running"
        return True, "ok"

    def health(self, route: str | None = None) -> tuple[HealthVerdict, dict[str, object]]:
        if route is not None and route not in self._healthy_after:
            raise UnknownRoute(route)
        states: dict[str, RoutePollState] = {}
        database_error: str | None = None
        try:
            states = self._polls.route_polls()
        except InfrastructureError as exc:
            database_error = describe_error(exc)
        now = self._clock()
        wanted = self._healthy_after if route is None else {route: self._healthy_after[route]}
        routes = {
            name: judge_route(
                states.get(name),
                now=now,
                healthy_after_seconds=window,
                running_since=self._running_since,
            )
            for name, window in wanted.items()
        }
        verdict = judge_process(
            database_error=database_error,
            scheduler_running=self.fleet.alive(),
            routes=routes,
        )
        if route is None:
            body = process_body(verdict, routes, states)
            orphaned = self._orphaned() if database_error is None else []
            if orphaned:
                # Nobody will send these: said here, not a reason for a 503.
                body["orphaned"] = [
                    {"destination": destination, "pending": pending}
                    for destination, pending in orphaned
                ]
            return verdict, body
        body = route_body(route, routes[route], states.get(route))
        local = self.fleet.snapshot()[route]
        body.update(pending=local.pending, failed=local.failed)
        body["next_fire"] = None if local.next_fire_at is None else local.next_fire_at.isoformat()
        if not verdict.ok and verdict.status is not routes[route].status:
            # The route may be fine; the process is not (database, scheduler).
            body["status"] = verdict.status.value
            body["reason"] = verdict.reason
        return verdict, body

    def _orphaned(self) -> list[tuple[str, int]]:
        if self._orphans is None:
            return []
        try:
            return self._orphans()
        except InfrastructureError:
            return []

    def render_metrics(self) -> bytes:
        return self.fleet.metrics.render()

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where HTTP listens once `run()` bound it (the real port when 0 was asked)."""
        server = self._server
        return None if server is None else server.address

    # --- signals -------------------------------------------------------------------------

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT handler: ask everything to stop; `run()` does the rest."""
        del frame
        self._signal = signum
        self._stop_event.set()

    def _install_signal_handlers(self) -> dict[int, Any]:
        # signal.signal() works only in the main thread; tests run the service elsewhere.
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.handle_signal) for signum in HANDLED_SIGNALS}

    # --- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until `stop_event` is set; 0 on a clean stop, 1 when the scheduler died."""
        previous_handlers = self._install_signal_handlers()
        try:
            if self._http_port != 0:
                self._server = HealthServer.start(self._http_host, self._http_port, self)
            for server in self._side_servers:
                server.start()
            self.fleet.start()
            address = self.http_address
            _LOG.info(
                "service started: %d routes, http %s",
                len(self.fleet.routes),
                f"{address[0]}:{address[1]}" if address else "off",
                extra={"action": "service_started"},
            )
            self.started.set()
            status = self._wait_for_stop()
            self.fleet.stop(self._shutdown_timeout)
            return status
        finally:
            for server in self._side_servers:
                server.stop()
            if self._server is not None:
                self._server.stop()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            _LOG.info("service stopped", extra={"action": "service_stopped"})

    def _wait_for_stop(self) -> int:
        # A timed wait, so the main thread keeps running Python code to take signals.
        while not self._stop_event.wait(_SIGNAL_CHECK_SECONDS):
            if not self.fleet.alive():
                _LOG.error("the scheduler died", extra={"action": "service_failed"})
                self._stop_event.set()
                return 1
        reason = signal.Signals(self._signal).name if self._signal is not None else "request"
        _LOG.info(
            "stopping (%s): no new polls; waiting up to %.0f s for the running ones",
            reason,
            self._shutdown_timeout,
            extra={"action": "service_stopping"},
        )
        return 0
