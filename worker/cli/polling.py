"""One poll: `once` and `dry_run`, and what they share with `run`: the poll under its
lease (`poll_once`), this process's lease token (`leases`) and the failure notice."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from worker.cli.wiring import (
    Logins,
    account_destination,
    destination,
    imap_mailbox,
    logins,
    mail_tidier,
    mailbox_name,
    pdf_inspector,
    pipeline_config,
    prepared_store,
    smtp_outbox,
)
from worker.config.routes import DEFAULT_ROUTE
from worker.config.settings import Settings
from worker.errors import LeaseLost, OAuthClientRejected, OAuthLoginRefused, StoreError
from worker.faults import checkpoint_for
from worker.models import DeliveryKind, PollReport
from worker.pdf.pool import PdfInspector
from worker.relay.dryrun import PlannedSighting
from worker.relay.lease import LEASE_SECONDS, Heartbeat, new_owner
from worker.relay.pacer import SendPacer
from worker.relay.pipeline import Pipeline

if TYPE_CHECKING:
    from worker.relay.notify import Notifier
from worker.relay.ports import MailActionStore
from worker.store import migrate
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore
from worker.tokens import AuthMethod

if TYPE_CHECKING:
    from worker.cli.kept import KeptSessions

log = logging.getLogger(__name__)


@contextmanager
def _pipeline(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    *,
    owner: str,
    route: str = DEFAULT_ROUTE,
    destination_name: str | None = None,  # None: the route's default (worker.cli.wiring)
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    inspector: PdfInspector | None = None,
    actions_store: MailActionStore | None = None,  # None: no after-forward step (dry run)
    kept: KeptSessions | None = None,  # `run`'s sessions kept between polls
) -> Iterator[Pipeline]:
    """A pipeline for one poll. With `inspector` (the service's warm pool) its workers
    are used and left running; without, a pool is started for this poll and closed.
    With `kept`, the poll reads on the IDLE connection when it is on offer and sends
    over the kept SMTP session."""
    owned = inspector is None
    if inspector is None:
        inspector = pdf_inspector(settings)
    checkpoint = checkpoint_for(settings.test_crash_at)
    lent = kept.lent_mailbox() if kept is not None else None
    outbox = kept.outbox if kept is not None else None
    try:
        yield Pipeline(
            config=pipeline_config(settings, route=route, destination=destination_name),
            mailbox=lent or imap_mailbox(settings, logins),
            outbox=outbox or destination(settings, store, logins, checkpoint=checkpoint),
            # INVOICE_RELAY_SMTP_SESSIONS: more SMTP sessions side by side; the API has
            # one client, paced by its budgets.
            more_outboxes=(
                [smtp_outbox(settings, logins) for _ in range(settings.smtp_sessions - 1)]
                if settings.delivery is DeliveryKind.SMTP
                else []
            ),
            store=store,
            owner=owner,
            inspector=inspector,
            pacer=SendPacer(settings.max_sends_per_minute, stop=stop),
            stop=stop,
            progress=progress,
            checkpoint=checkpoint,
            tidier=(
                mail_tidier(settings, actions_store, logins, checkpoint=checkpoint)
                if actions_store is not None
                else None
            ),
        )
    finally:
        if lent is not None:
            lent.close()  # given back already when the poll ran; here if it never did
        if owned:
            inspector.close()


def poll_once(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    *,
    owner: str,
    route: str = DEFAULT_ROUTE,
    destination_name: str | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    inspector: PdfInspector | None = None,
    kept: KeptSessions | None = None,
) -> PollReport:
    """One poll of `route` under the mailbox's poll lease, held by `owner` (whose
    heartbeat keeps its leases alive: `leases`); `kept`: `run`'s sessions
    (`worker.cli.kept`)."""
    name = mailbox_name(settings)
    started = datetime.now(UTC)
    if destination_name is None and settings.delivery is DeliveryKind.GETMYINVOICES:
        # Dedup is per destination: an API route's is its account, asked of the API.
        destination_name = account_destination(settings, store)
    with store.poll_lock(name, owner=owner, lease_seconds=LEASE_SECONDS) as acquired:
        if not acquired:
            log.info(
                "another replica holds the poll lock of %s",
                name,
                extra={"action": "poll_locked", "mailbox": name},
            )
            return PollReport(mailbox=name, started_at=started, finished_at=started, locked=True)
        try:
            with _pipeline(
                settings,
                store,
                logins,
                owner=owner,
                route=route,
                destination_name=destination_name,
                stop=stop,
                progress=progress,
                inspector=inspector,
                actions_store=store,
                kept=kept,
            ) as pipeline:
                report = pipeline.poll()
        except LeaseLost as lost:
            # Frozen or cut off past a lease: another process took over, and what this
            # one would have written was refused. Not a failure of the relay.
            log.warning(
                "lease lost, the poll ends: %s",
                lost.detail,
                extra={"action": "lease_lost", "mailbox": name},
            )
            return PollReport(
                mailbox=name, started_at=started, finished_at=datetime.now(UTC), locked=True
            )
        except (OAuthLoginRefused, OAuthClientRejected) as refused:
            notify_login_failure(settings, store, logins, str(refused), owner=owner, route=route)
            raise
        # Inside the poll lock: no other replica records sightings while it reads them.
        notify_after_poll(settings, store, logins, owner=owner, route=route)
        return report


@contextmanager
def leases(store: SqlStore) -> Iterator[str]:
    """This process run's lease token, its leases renewed by a heartbeat while the block
    runs and every one of them handed back on the way out, so that the next process need
    not wait for them to expire."""
    owner = new_owner()
    heartbeat = Heartbeat(store, owner).start()
    try:
        yield owner
    finally:
        heartbeat.stop()
        release_leases(store, owner)


def release_leases(store: SqlStore, owner: str) -> None:
    try:
        released = store.release_all(owner)
    except StoreError as exc:
        log.warning(
            "handing back the leases failed; they expire within %.0f s: %s",
            LEASE_SECONDS,
            exc,
            extra={"action": "release_failed"},
        )
        return
    if released:
        log.info(
            "%d claimed documents handed back for the next poll",
            released,
            extra={"action": "leases_released"},
        )


def notify_after_poll(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    *,
    owner: str,
    route: str = DEFAULT_ROUTE,
) -> None:
    """One failure notice to INVOICE_RELAY_NOTIFY_TO when one is due, under `owner`'s
    notice lease; a failure to send it is logged by the notifier and never fails the poll."""
    if settings.notify_to is None:
        return
    _notifier(settings, store, logins, owner=owner, route=route).after_poll()


def _notifier(
    settings: Settings, store: SqlStore, logins: Logins, *, owner: str, route: str
) -> Notifier:
    from worker.relay.notify import Notifier
    from worker.store.notices import SqlNoticeLog

    if settings.notify_to is None:
        raise ValueError("no INVOICE_RELAY_NOTIFY_TO")
    return Notifier(
        log=SqlNoticeLog(store.engine),
        sender=lambda: smtp_outbox(settings, logins),
        notify_to=settings.notify_to,
        notify_from=settings.forward_from,
        mailbox=mailbox_name(settings),
        route=route,
        owner=owner,
        interval_seconds=settings.notify_interval_seconds,
    )


def notify_login_failure(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    reason: str,
    *,
    owner: str,
    route: str = DEFAULT_ROUTE,
) -> None:
    """A notice that the OAuth2 grant or client was refused, when a transport for it
    remains: SMTP with a password (or none). On SMTP with oauth2 the notice would need
    the very credential that failed: `check`, `/healthz` and the status page say it."""
    if settings.notify_to is None or settings.smtp_auth is AuthMethod.OAUTH2:
        return
    _notifier(settings, store, logins, owner=owner, route=route).after_login_failure(reason)


def once(settings: Settings, *, progress: Callable[[str], None] | None = None) -> PollReport:
    from worker.service.shutdown import exit_within
    from worker.service.signals import stop_on_signals

    stop = threading.Event()
    with stop_on_signals(stop):
        store = prepared_store(settings)
        try:
            with logins(settings, store) as made, leases(store) as owner:
                # SIGTERM: the poll stops between mails and hands back what it holds; a
                # network call that keeps waiting is not waited for past the deadline.
                watched = exit_within(
                    stop, on_expiry=lambda: release_leases(store, owner), exit_code=1
                )
                with watched:
                    return poll_once(
                        settings, store, made, owner=owner, stop=stop, progress=progress
                    )
        finally:
            store.close()


def dry_run(
    settings: Settings, *, route: str = DEFAULT_ROUTE, destination_name: str | None = None
) -> list[PlannedSighting]:
    """What `once` would record now. Writes nothing: on a database that was never
    migrated, an empty in-memory one stands in for it."""
    url = settings.database_url.reveal()
    path = settings.sqlite_path()
    try:
        # Opening a missing SQLite file would create it: a dry run must not.
        up_to_date = (path is None or path.exists()) and migrate.is_up_to_date(url)
    except StoreError:
        up_to_date = False
    if up_to_date:
        store = SqlStore(url)
    elif settings.oauth is not None:
        # A token got now may come with a rotated refresh token: kept only in memory it
        # would be lost, and the one configured already spent.
        raise StoreError(
            "a dry run with an oauth2 login needs the migrated database, where its tokens "
            "are kept (run `invoice-relay db upgrade` first)"
        )
    else:
        store = SqlStore("sqlite://")
        create_schema(store.engine)
    try:
        # An owner that holds no lease: were a dry run ever to write, it would be refused.
        if destination_name is None and settings.delivery is DeliveryKind.GETMYINVOICES:
            destination_name = account_destination(settings, store)  # GET /account only
        with (
            logins(settings, store) as made,
            _pipeline(
                settings,
                store,
                made,
                owner=new_owner(),
                route=route,
                destination_name=destination_name,
            ) as pipeline,
        ):
            return pipeline.plan()
    finally:
        store.close()
