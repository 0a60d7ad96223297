"""`run` with a routes file: every route on its own fire times, claimed per replica
(worker.service.fleet), one warm PDF pool and one lease token for all of them, and
IMAP IDLE for the routes that ask for it, each watched by one replica under a lease.

Without a file the environment's one route runs as before (worker.cli.serve)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Protocol

from worker.cli.polling import leases, release_leases
from worker.cli.routing import Destinations, poll_route
from worker.cli.serve import run_service, status_page, store_with_backoff
from worker.cli.wiring import imap_mailbox, logins, pdf_inspector
from worker.config.routes import Deployment, Route
from worker.config.schedule import interval_hint, parse_schedule
from worker.errors import RelayError
from worker.logs import route_context
from worker.models import DeliveryKind, PollReport, PollStatus
from worker.pdf.pool import PdfInspector
from worker.relay.lease import LEASE_SECONDS
from worker.service.fleet import Fleet, RouteSchedule
from worker.service.ports import RoutePolls as LastPolls
from worker.service.routepoll import RouteOutcome
from worker.store.sqlstore import SqlStore

log = logging.getLogger(__name__)

# IMAP IDLE holds a connection and a thread per watched route: at most this many per
# replica (README, "Several mailboxes"); further IDLE routes are polled on schedule
# until a replica with room takes their watch.
MAX_IDLE_WATCHES = 20
_EPOCH = datetime.fromtimestamp(0, UTC)


def run_deployment(deployment: Deployment) -> int:
    if deployment.config_file is None:
        return run_service(deployment.routes[0].settings)
    return run_routes(deployment)


def run_routes(deployment: Deployment) -> int:
    from worker.service.fleetservice import FleetService
    from worker.service.shutdown import exit_within
    from worker.service.signals import stop_on_signals

    process = deployment.process
    stop = threading.Event()
    closing = ExitStack()
    with stop_on_signals(stop):
        store = store_with_backoff(process, stop)
        if store is None:
            return 0
        inspectors = Inspectors()
        inspectors.of(deployment.routes[0]).prestart()  # warm before the first mail
        try:
            owner = closing.enter_context(leases(store))
            closing.enter_context(
                exit_within(stop, on_expiry=lambda: release_leases(store, owner), exit_code=0)
            )
            polls = RoutePolls(deployment, store, owner=owner, stop=stop, inspectors=inspectors)
            specs = {
                route.name: parse_schedule(route.settings.schedule, route.settings.timezone)
                for route in deployment.routes
            }
            fleet = Fleet(
                routes=[RouteSchedule(name=name, spec=spec) for name, spec in specs.items()],
                poll=polls.poll,
                claims=store,
                owner=owner,
                max_parallel_polls=deployment.max_parallel_polls,
            )
            polls.fleet = fleet
            service = FleetService(
                fleet=fleet,
                polls=store,
                healthy_after={
                    route.name: route.settings.healthy_after_seconds
                    or 3 * interval_hint(specs[route.name]) + 60
                    for route in deployment.routes
                },
                http_port=process.http_port,
                stop_event=stop,
                side_servers=status_page(process, store, lambda: poll_status(store, fleet)),
                orphans=lambda: store.orphaned_destinations(
                    [route.mailbox for route in deployment.routes]
                ),
            )
            try:
                return service.run()
            finally:
                polls.end_watches()
        finally:
            closing.close()
            inspectors.close()
            store.close()


class Inspectors:
    """The warm PDF pools of `run`: one per distinct way of reading PDFs (the invoice
    number's pattern, and the credit-note pattern of API routes), not one per route. A
    file whose routes all read PDFs alike has one."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str | None, str | None], PdfInspector] = {}
        self._lock = threading.Lock()

    def of(self, route: Route) -> PdfInspector:
        settings = route.settings
        key = (
            settings.invoice_number_pattern,
            # as worker.cli.wiring.pdf_inspector: only the API files credit notes apart
            settings.gmi_credit_note_pattern
            if settings.delivery is DeliveryKind.GETMYINVOICES
            else None,
        )
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                self._pools[key] = pool = pdf_inspector(settings)
            return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


class RoutePolls:
    """What the fleet runs for one (route, fire time): the route's poll under its poll
    lease, then its IDLE watch kept (or taken, or given up)."""

    def __init__(
        self,
        deployment: Deployment,
        store: SqlStore,
        *,
        owner: str,
        stop: threading.Event,
        inspectors: Inspectors,
    ) -> None:
        self._routes = {route.name: route for route in deployment.routes}
        self._store = store
        self._owner = owner
        self._stop = stop
        self._inspectors = inspectors
        self._destinations = Destinations(store)
        self._watches: dict[str, threading.Event] = {}
        self._again: set[str] = set()  # routes with a poll asked for after a held lease
        self._lock = threading.Lock()
        self.fleet: Fleet | None = None  # set once built: IDLE announcements poll through it

    def poll(self, name: str, fire_time: datetime) -> PollReport:
        del fire_time  # the fleet logs and claims it
        route = self._routes[name]
        report = poll_route(
            route,
            self._store,
            self._destinations,
            owner=self._owner,
            stop=self._stop,
            inspector=self._inspectors.of(route),
        )
        if report.locked:
            self._ask_again(name)
        elif route.settings.idle:
            self._keep_watch(route)
        return report

    def _ask_again(self, name: str) -> None:
        """The route's poll lease was held (a peer's long poll, or a relay that died
        holding it and was restarted at once): poll again once that lease can have
        expired, not a whole interval later. One timer per route at most."""
        with self._lock:
            if name in self._again:
                return
            self._again.add(name)

        def again() -> None:
            with self._lock:
                self._again.discard(name)
            if self.fleet is not None and not self._stop.is_set():
                self.fleet.poll_now(name)

        timer = threading.Timer(LEASE_SECONDS + 1.0, again)
        timer.daemon = True
        timer.start()

    def _keep_watch(self, route: Route) -> None:
        """One replica watches a route with IDLE: the one holding its `idle:` lease,
        renewed by this process's heartbeat. Checked at each of the route's fire times,
        so a dead watcher's route is taken over within one interval after its lease.
        Never fails the poll that called it: a database error leaves it to the next."""
        with self._lock:
            watching = self._watches.get(route.name)
            if watching is None:
                if len(self._watches) >= MAX_IDLE_WATCHES:
                    return
                # The slot is reserved before the lease is asked for: parallel polls
                # must not pass the cap together.
                watching = self._watches[route.name] = threading.Event()
                fresh = True
            else:
                fresh = False
        try:
            held = self._store.take_poll_lease(
                f"idle:{route.mailbox}", owner=self._owner, lease_seconds=LEASE_SECONDS
            )
        except RelayError as exc:
            log.warning(
                "the IDLE lease could not be checked: %s",
                exc,
                extra={"action": "idle_lease_unknown", "route": route.name},
            )
            held = not fresh  # a running watch goes on; a new one waits
        if held and fresh:
            threading.Thread(
                target=self._watch,
                args=(route, watching),
                name=f"invoice-relay-idle-{route.name}",
                daemon=True,
            ).start()
            return
        if held:
            return
        watching.set()
        with self._lock:
            if self._watches.get(route.name) is watching:
                del self._watches[route.name]
        if not fresh:  # frozen past the lease: another replica watches now
            log.warning(
                "another replica took over the IDLE watch",
                extra={"action": "idle_lost", "route": route.name},
            )

    def end_watches(self) -> None:
        """The service stops: every IDLE watch ends (and hands its lease back)."""
        with self._lock:
            for ended in self._watches.values():
                ended.set()

    def _watch(self, route: Route, ended: threading.Event) -> None:
        from worker.service.idle import IdleWatcher

        try:
            with route_context(route.name), logins(route.settings, self._store) as made:
                mailbox = imap_mailbox(route.settings, made, for_idle=True)
                fleet = self.fleet
                if fleet is not None:
                    IdleWatcher(
                        mailbox=mailbox,
                        on_new_mail=lambda: fleet.poll_now(route.name),
                        stop=ended,
                    ).run()
        except RelayError as exc:
            log.warning(
                "the IDLE watch ended: %s; the schedule goes on polling",
                exc,
                extra={"action": "idle_failed", "route": route.name},
            )
        except Exception:
            log.exception(
                "the IDLE watch ended", extra={"action": "idle_failed", "route": route.name}
            )
        finally:
            with self._lock:
                if self._watches.get(route.name) is ended:
                    del self._watches[route.name]
            with contextlib.suppress(RelayError):  # else it expires within a lease
                self._store.end_poll_lease(f"idle:{route.mailbox}", owner=self._owner)


def poll_status(polls: LastPolls, fleet: FireTimes) -> PollStatus:
    """The status page's overview line: the latest poll of any route, by any replica,
    and the soonest next fire time of this replica's routes."""
    states = polls.route_polls().values()
    upcoming = [o.next_fire_at for o in fleet.snapshot().values() if o.next_fire_at]
    finished = [state.last_finished_at for state in states if state.last_finished_at]
    success = [state.last_success_at for state in states if state.last_success_at]
    errors = [state for state in states if state.last_error and state.last_finished_at]
    latest = max(errors, key=lambda state: state.last_finished_at or _EPOCH, default=None)
    return PollStatus(
        last_finished_at=max(finished, default=None),
        last_success_at=max(success, default=None),
        last_error=latest.last_error if latest else None,
        last_error_at=latest.last_finished_at if latest else None,
        next_poll_at=min(upcoming, default=None),
    )


class FireTimes(Protocol):
    def snapshot(self) -> Mapping[str, RouteOutcome]: ...
