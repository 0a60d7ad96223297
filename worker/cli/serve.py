"""`run`: the long-running service wired from settings (worker.service.runner runs it):
the database wait, the warm PDF pool, the status page and the IMAP IDLE watcher."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING

from worker.cli.kept import KeptSessions, kept_sessions
from worker.cli.polling import leases, poll_once, release_leases
from worker.cli.wiring import Logins, logins, pdf_inspector, prepared_store
from worker.config.settings import Settings
from worker.errors import StoreError
from worker.models import PollStatus
from worker.pdf.pool import PdfInspector
from worker.service.idle import PollRequests
from worker.service.runner import SideServer
from worker.store.sqlstore import SqlStore

if TYPE_CHECKING:
    from worker.config.schedule import ScheduleSpec

log = logging.getLogger(__name__)


def run_service(settings: Settings) -> int:
    from worker.config.schedule import interval_hint, parse_schedule
    from worker.service.shutdown import exit_within
    from worker.service.signals import stop_on_signals

    spec = parse_schedule(settings.schedule, settings.timezone)
    stop = threading.Event()
    closing = ExitStack()
    # Installed before the wait for the database: a SIGTERM then is a clean stop too.
    with stop_on_signals(stop):
        store = store_with_backoff(settings, stop)
        if store is None:
            return 0
        healthy_after = settings.healthy_after_seconds or 3 * interval_hint(spec) + 60
        # One pool for the service's life: starting workers on every poll was most of
        # the time from an IDLE announcement to the forwarded mail. The pool replaces a
        # worker that crashed or timed out by itself.
        inspector = pdf_inspector(settings)
        inspector.prestart()  # warm before the first mail, not on its arrival
        try:
            # The token sources serve every poll and the IDLE watcher for the service's life.
            login_with = closing.enter_context(logins(settings, store))
            owner = closing.enter_context(leases(store))
            # The service waits for a running poll for a bounded time; past that, a network
            # call that keeps waiting must not keep the process alive (the poll's pool
            # threads are not daemons, and the interpreter joins them).
            closing.enter_context(
                exit_within(stop, on_expiry=lambda: release_leases(store, owner), exit_code=0)
            )
            return _serve(
                settings,
                store,
                login_with,
                owner=owner,
                stop=stop,
                spec=spec,
                healthy_after=healthy_after,
                inspector=inspector,
                kept=closing.enter_context(kept_sessions(settings, login_with)),
            )
        finally:
            closing.close()
            inspector.close()
            store.close()


def status_page(
    settings: Settings, store: SqlStore, poll_status: Callable[[], PollStatus]
) -> tuple[SideServer, ...]:
    """The status page's server when a web user is configured, else nothing."""
    if settings.web is None:
        return ()
    from worker.web.app import StatusPage
    from worker.web.server import WebServer

    page = StatusPage(
        settings=settings.web, reader=store, admin=store, sessions=store, poll_status=poll_status
    )
    return (WebServer(page.app, host=settings.web.host, port=settings.web.port),)


def _serve(
    settings: Settings,
    store: SqlStore,
    login_with: Logins,
    *,
    owner: str,
    stop: threading.Event,
    spec: ScheduleSpec,
    healthy_after: float,
    inspector: PdfInspector,
    kept: KeptSessions,
) -> int:
    from worker.config.schedule import build_trigger
    from worker.service.metrics import RelayMetrics
    from worker.service.runner import Service

    requests = PollRequests(
        lambda: poll_once(
            settings, store, login_with, owner=owner, stop=stop, inspector=inspector, kept=kept
        ),
        desk=kept.desk,
    )
    service = Service(
        poll=requests.poll,
        trigger=build_trigger(spec),
        http_port=settings.http_port,
        healthy_after_seconds=healthy_after,
        stop_event=stop,
        metrics=RelayMetrics(),
        # The closure reads `service` when a page is asked for, by then assigned.
        side_servers=status_page(settings, store, lambda: service.poll_status()),  # noqa: PLW0108
    )
    if settings.idle:  # polls as soon as mail comes; the schedule stays the net
        requests.connect(service.poll_now)
        kept.watch(requests.new_mail, stop)
    return service.run()


def store_with_backoff(settings: Settings, stop: threading.Event) -> SqlStore | None:
    """The service waits for its database instead of dying in a restart loop."""
    delay = 1.0
    while True:
        try:
            return prepared_store(settings)
        except StoreError as exc:
            log.warning(
                "database unavailable, retrying in %.0fs: %s",
                delay,
                exc,
                extra={"action": "database_unavailable"},
            )
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 60.0)
