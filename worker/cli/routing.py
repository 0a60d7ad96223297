"""Several routes in one process (README, "Several mailboxes: the routes file"): `once`
over every route, each independently, and the destination each route delivers to."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.cli.polling import leases, poll_once, release_leases
from worker.cli.wiring import account_destination, logins, prepared_store
from worker.config.routes import Deployment, Route
from worker.errors import InfrastructureError, RelayError
from worker.logs import route_context
from worker.models import PollReport
from worker.pdf.pool import PdfInspector
from worker.store.sqlstore import SqlStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteOutcome:
    """One route's poll in `once`: its report, or why it could not complete."""

    route: str
    report: PollReport | None = None
    error: str | None = None


class Destinations:
    """Each route's destination name, asked of GetMyInvoices (`GET /account`) at most
    once per process for a route whose file names none."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()

    def of(self, route: Route) -> str:
        if route.destination is not None:
            return route.destination
        with self._lock:
            known = self._known.get(route.name)
        if known is not None:
            return known
        name = account_destination(route.settings, self._store)
        with self._lock:
            self._known[route.name] = name
        return name


def poll_route(
    route: Route,
    store: SqlStore,
    destinations: Destinations,
    *,
    owner: str,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    inspector: PdfInspector | None = None,
) -> PollReport:
    """One route's poll with logins of its own (OAuth2 token sources closed after it);
    `inspector`: `run`'s warm pool (None: one for this poll)."""
    with route_context(route.name), logins(route.settings, store) as made:
        return poll_once(
            route.settings,
            store,
            made,
            owner=owner,
            route=route.name,
            destination_name=destinations.of(route),
            stop=stop,
            progress=progress,
            inspector=inspector,
        )


def once_each(
    deployment: Deployment,
    routes: Sequence[Route],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[RouteOutcome]:
    """`once` for several routes: one after another, a failing route not stopping the
    others; SIGTERM ends the run between routes (and inside one, between mails)."""
    from worker.service.shutdown import exit_within
    from worker.service.signals import stop_on_signals

    stop = threading.Event()
    outcomes: list[RouteOutcome] = []
    with stop_on_signals(stop):
        store = prepared_store(deployment.process)
        try:
            destinations = Destinations(store)
            with leases(store) as owner:
                watched = exit_within(
                    stop, on_expiry=lambda: release_leases(store, owner), exit_code=1
                )
                with watched:
                    for route in routes:
                        if stop.is_set():
                            outcomes.append(RouteOutcome(route=route.name, error="stopped"))
                            continue
                        outcomes.append(
                            _one(
                                route,
                                store,
                                destinations,
                                owner=owner,
                                stop=stop,
                                progress=progress,
                            )
                        )
        finally:
            store.close()
    return outcomes


def _one(
    route: Route,
    store: SqlStore,
    destinations: Destinations,
    *,
    owner: str,
    stop: threading.Event,
    progress: Callable[[str], None] | None,
) -> RouteOutcome:
    try:
        report = poll_route(route, store, destinations, owner=owner, stop=stop, progress=progress)
    except (RelayError, InfrastructureError) as exc:
        log.warning(
            "poll failed: %s",
            exc,
            extra={"action": "poll_failed", "route": route.name},
        )
        return RouteOutcome(route=route.name, error=str(exc))
    except Exception:
        log.exception(
            "poll failed unexpectedly", extra={"action": "poll_failed", "route": route.name}
        )
        return RouteOutcome(route=route.name, error="unexpected error (see the log)")
    return RouteOutcome(route=route.name, report=report)
