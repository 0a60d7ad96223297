"""The commands behind the CLI: build the adapters from settings and run one job."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from worker.config.settings import Secret, Settings, http_port_from_env
from worker.delivery.getmyinvoices import ALREADY_THERE, GmiDestination
from worker.delivery.smtp import SmtpOutbox
from worker.errors import ConfigError, LeaseLost, StoreError
from worker.faults import Checkpoint, checkpoint_for, no_checkpoint
from worker.imap.mailbox import ImapMailbox
from worker.mail.trust import TrustPolicy
from worker.models import (
    AuditFilter,
    AuditRow,
    Credentials,
    DeliveryKind,
    PasswordCredentials,
    PollReport,
    PollStatus,
    sqlite_file,
)
from worker.pdf.pool import PdfInspector
from worker.relay.budget import Budget, SharedBudget
from worker.relay.dryrun import PlannedSighting
from worker.relay.lease import LEASE_SECONDS, Heartbeat, new_owner
from worker.relay.pacer import SendPacer
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.relay.ports import Destination, MailActionStore
from worker.relay.tidy import MailTidier
from worker.service.idle import IdleWatcher, PollRequests
from worker.service.runner import SideServer
from worker.store import migrate
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore
from worker.tokens import AuthMethod

if TYPE_CHECKING:
    from worker.config.schedule import ScheduleSpec

log = logging.getLogger(__name__)


def mailbox_name(settings: Settings) -> str:
    """The audit's name for the polled folder; stable across port or TLS changes."""
    return f"{settings.imap_user}@{settings.imap_host}/{settings.imap_folder}"


def pipeline_config(settings: Settings) -> PipelineConfig:
    # A small batch: what a sender frozen mid-batch holds until its leases expire.
    send_batch = 5
    return PipelineConfig(
        mailbox=mailbox_name(settings),
        forward_to=settings.forward_to,
        forward_from=settings.forward_from,
        since=settings.since,
        dedup=settings.dedup,
        keep_pdfs=settings.keep_pdfs,
        allowed_senders=settings.allowed_senders,
        max_mail_bytes=settings.max_mail_bytes,
        max_pdf_bytes=settings.max_pdf_bytes,
        max_parts=settings.max_parts,
        max_depth=settings.max_depth,
        trust=TrustPolicy(
            require_dkim=settings.require_dkim,
            dkim_domains=settings.dkim_domains,
            trusted_authserv_id=settings.trusted_authserv_id,
        ),
        max_attempts=settings.max_attempts,
        error_retries=settings.error_retries,
        lease_seconds=LEASE_SECONDS,
        send_batch=send_batch,
        retry_delay_seconds=settings.retry_delay_seconds,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Logins:
    """What IMAP and SMTP log in with for one command: passwords, or OAuth2 token
    credentials (their token sources live as long as the command: `logins`)."""

    imap: Credentials
    smtp: Credentials | None  # None: the SMTP server takes mail without a login


def password_logins(settings: Settings) -> Logins:
    """The password logins; for settings with an oauth2 login, `logins` is needed (its
    tokens live in the store)."""
    if settings.oauth is not None:
        raise ConfigError("INVOICE_RELAY_IMAP_AUTH", "an oauth2 login needs the token store")
    return Logins(
        imap=PasswordCredentials(user=settings.imap_user, password=settings.imap_password),
        smtp=smtp_credentials(settings),
    )


@contextmanager
def logins(settings: Settings, store: SqlStore) -> Iterator[Logins]:
    """The command's logins; OAuth2 token sources (and their HTTP client) are closed
    when the command ends."""
    if settings.oauth is None:
        yield password_logins(settings)
        return
    from worker.cli.oauth import oauth_logins  # MSAL and google-auth only when used

    made = oauth_logins(settings, store)
    if made is None:  # no protocol on oauth2: Settings left `oauth` unset then
        yield password_logins(settings)
        return
    on_oauth2 = settings.smtp_auth is AuthMethod.OAUTH2
    try:
        yield Logins(
            imap=made.imap
            or PasswordCredentials(user=settings.imap_user, password=settings.imap_password),
            smtp=made.smtp if on_oauth2 else smtp_credentials(settings),
        )
    finally:
        made.sources.close()


def imap_mailbox(
    settings: Settings, logins: Logins | None = None, *, for_idle: bool = False
) -> ImapMailbox:
    """The polled folder; `for_idle`: the watcher's connection of its own, which stays
    open for hours and so has no poll deadline."""
    return ImapMailbox(
        host=settings.imap_host,
        port=settings.imap_port,
        security=settings.imap_security,
        credentials=(logins or password_logins(settings)).imap,
        folder=settings.imap_folder,
        ca_file=settings.ca_file,
        timeout=settings.timeout_seconds,
        deadline_seconds=None if for_idle else settings.poll_deadline_seconds,
    )


def smtp_credentials(settings: Settings) -> PasswordCredentials | None:
    """None when no SMTP user is set: the server takes mail without a login."""
    if not settings.smtp_user:
        return None
    return PasswordCredentials(
        user=settings.smtp_user, password=settings.smtp_password or Secret("")
    )


def smtp_outbox(settings: Settings, logins: Logins | None = None) -> SmtpOutbox:
    return SmtpOutbox(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        credentials=(logins or password_logins(settings)).smtp,
        forward_from=settings.forward_from,
        forward_to=settings.forward_to,
        ca_file=settings.ca_file,
        timeout=settings.timeout_seconds,
    )


def gmi_destination(
    settings: Settings, store: SqlStore, *, checkpoint: Checkpoint = no_checkpoint
) -> GmiDestination:
    """The GetMyInvoices API, its budgets and upload marks kept in `store`."""
    pattern = settings.gmi_credit_note_pattern
    return GmiDestination(
        api_key=settings.gmi_api_key or Secret(""),
        budget=SharedBudget(
            store=store,
            budget=Budget(
                calls_per_minute=settings.gmi_calls_per_minute,
                calls_per_day=settings.gmi_calls_per_day,
            ),
            clock=lambda: datetime.now(UTC),
        ),
        marks=store,
        api_url=settings.gmi_api_url,
        document_type=settings.gmi_document_type,
        credit_note_pattern=re.compile(pattern) if pattern else None,
        run_ocr=settings.gmi_run_ocr,
        tags=settings.gmi_tags,
        ca_file=settings.ca_file,
        timeout=settings.timeout_seconds,
        checkpoint=checkpoint,
    )


def destination(
    settings: Settings,
    store: SqlStore,
    logins: Logins | None = None,
    *,
    checkpoint: Checkpoint = no_checkpoint,
) -> Destination:
    """Where documents go (INVOICE_RELAY_DELIVERY)."""
    if settings.delivery is DeliveryKind.GETMYINVOICES:
        return gmi_destination(settings, store, checkpoint=checkpoint)
    return smtp_outbox(settings, logins)


def pdf_inspector(settings: Settings) -> PdfInspector:
    return PdfInspector(
        timeout_seconds=settings.pdf_timeout_seconds,
        memory_limit_bytes=settings.pdf_memory_mb * 1024 * 1024,
        invoice_pattern=settings.invoice_number_pattern,
        # Only the API files credit notes apart; mail forwarding needs no such reading.
        credit_note_pattern=(
            settings.gmi_credit_note_pattern
            if settings.delivery is DeliveryKind.GETMYINVOICES
            else None
        ),
    )


def prepared_store(settings: Settings) -> SqlStore:
    """The store, with its SQLite folder created and migrations applied."""
    path = settings.sqlite_path()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder {path.parent}: {exc.strerror or exc}"
            ) from exc
    url = settings.database_url.reveal()
    migrate.upgrade_database(url)
    return SqlStore(url)


@contextmanager
def _pipeline(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    *,
    owner: str,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    inspector: PdfInspector | None = None,
    actions_store: MailActionStore | None = None,  # None: no after-forward step (dry run)
) -> Iterator[Pipeline]:
    """A pipeline for one poll. With `inspector` (the service's warm pool) its workers
    are used and left running; without, a pool is started for this poll and closed."""
    owned = inspector is None
    if inspector is None:
        inspector = pdf_inspector(settings)
    checkpoint = checkpoint_for(settings.test_crash_at)
    try:
        yield Pipeline(
            config=pipeline_config(settings),
            mailbox=imap_mailbox(settings, logins),
            outbox=destination(settings, store, logins, checkpoint=checkpoint),
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
        if owned:
            inspector.close()


def mail_tidier(
    settings: Settings,
    store: MailActionStore,
    logins: Logins,
    *,
    checkpoint: Checkpoint = no_checkpoint,
) -> MailTidier | None:
    """The after-forward step, with an IMAP session of its own; None for `keep`."""
    if not settings.after_forward.changes_mailbox:
        return None
    return MailTidier(
        after=settings.after_forward,
        mailbox=mailbox_name(settings),
        actions=imap_mailbox(settings, logins),
        store=store,
        clock=lambda: datetime.now(UTC),
        checkpoint=checkpoint,
    )


def poll_once(
    settings: Settings,
    store: SqlStore,
    logins: Logins,
    *,
    owner: str,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    inspector: PdfInspector | None = None,
) -> PollReport:
    """One poll under the mailbox's poll lease, held by `owner` (whose heartbeat keeps
    its leases alive: `leases`)."""
    name = mailbox_name(settings)
    started = datetime.now(UTC)
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
                stop=stop,
                progress=progress,
                inspector=inspector,
                actions_store=store,
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
        # Inside the poll lock: no other replica records sightings while it reads them.
        notify_after_poll(settings, store, logins)
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


def notify_after_poll(settings: Settings, store: SqlStore, logins: Logins) -> None:
    """One failure notice to INVOICE_RELAY_NOTIFY_TO when one is due; a failure to send
    it is logged by the notifier and never fails the poll."""
    if settings.notify_to is None:
        return
    from worker.relay.notify import Notifier
    from worker.store.notices import SqlNoticeLog

    Notifier(
        log=SqlNoticeLog(store.engine),
        sender=lambda: smtp_outbox(settings, logins),
        notify_to=settings.notify_to,
        notify_from=settings.forward_from,
        mailbox=mailbox_name(settings),
        interval_seconds=settings.notify_interval_seconds,
    ).after_poll()


def once(settings: Settings, *, progress: Callable[[str], None] | None = None) -> PollReport:
    from worker.service.runner import stop_on_signals
    from worker.service.shutdown import exit_within

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


def dry_run(settings: Settings) -> list[PlannedSighting]:
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
        with (
            logins(settings, store) as made,
            _pipeline(settings, store, made, owner=new_owner()) as pipeline,
        ):
            return pipeline.plan()
    finally:
        store.close()


def run_service(settings: Settings) -> int:
    from worker.config.schedule import interval_hint, parse_schedule
    from worker.service.runner import stop_on_signals
    from worker.service.shutdown import exit_within

    spec = parse_schedule(settings.schedule, settings.timezone)
    stop = threading.Event()
    closing = ExitStack()
    # Installed before the wait for the database: a SIGTERM then is a clean stop too.
    with stop_on_signals(stop):
        store = _store_with_backoff(settings, stop)
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
) -> int:
    from worker.config.schedule import build_trigger
    from worker.service.metrics import RelayMetrics
    from worker.service.runner import Service

    requests = PollRequests(
        lambda: poll_once(settings, store, login_with, owner=owner, stop=stop, inspector=inspector)
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
        mailbox = imap_mailbox(settings, login_with, for_idle=True)
        IdleWatcher(mailbox=mailbox, on_new_mail=requests.new_mail, stop=stop).start()
    return service.run()


def _store_with_backoff(settings: Settings, stop: threading.Event) -> SqlStore | None:
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


def _existing_database(url: str) -> SqlStore:
    """Read-only and maintenance commands never create a database by accident."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StoreError(f"no database at {path} yet (run `invoice-relay once` first)")
    if migrate.current_revision(url) is None:
        raise StoreError(
            "the database holds no relay tables yet (run `invoice-relay db upgrade` or a poll)"
        )
    return SqlStore(url)


def audit_rows(url: str, query: AuditFilter) -> list[AuditRow]:
    store = _existing_database(url)
    try:
        return store.audit(query)
    finally:
        store.close()


def oauth_status(settings: Settings) -> list[str]:
    from worker.cli.oauth import status_lines  # MSAL and google-auth only when asked

    store = _existing_database(settings.database_url.reveal())
    try:
        return status_lines(settings, store)
    finally:
        store.close()


def oauth_login(
    settings: Settings, *, show: Callable[[str], None], pasted: Callable[[], str]
) -> str:
    from worker.cli.oauth import login

    store = prepared_store(settings)  # the refresh token is stored: migrate like a poll
    try:
        return login(settings, store, show=show, pasted=pasted)
    finally:
        store.close()


def upgrade(url: str) -> None:
    migrate.upgrade_database(url)


def retry(url: str, sha256: str | None) -> int:
    store = _existing_database(url)
    try:
        return store.requeue(sha256=sha256, now=datetime.now(UTC))
    finally:
        store.close()


def resend(url: str, sha256: str) -> bool:
    store = _existing_database(url)
    try:
        return store.resend(sha256=sha256, now=datetime.now(UTC))
    finally:
        store.close()


def resend_through_api(settings: Settings, sha256: str) -> tuple[bool, str]:
    """`resend` with INVOICE_RELAY_DELIVERY=getmyinvoices: queued only when the API says
    it does not hold the document (a second copy would be filed otherwise)."""
    store = _existing_database(settings.database_url.reveal())
    try:
        content = store.kept_content(sha256)
        if content is None:
            return False, (
                "no document with that SHA-256 whose bytes are kept (INVOICE_RELAY_KEEP_PDFS)"
            )
        api = gmi_destination(settings, store)
        try:
            there = api.exists(content)
        finally:
            api.close()
        if there:
            return False, f"not queued: {ALREADY_THERE}"
        queued = store.resend(sha256=sha256, now=datetime.now(UTC))
        return queued, "queued for a deliberate resend" if queued else "not a forwarded document"
    finally:
        store.close()


def healthcheck(environ: Mapping[str, str], *, ready: bool) -> int:
    from worker.service.health import probe_health

    port = http_port_from_env(environ)
    if port == 0:
        print("the HTTP server is off (INVOICE_RELAY_HTTP_PORT=0): nothing to ask")
        return 1
    healthy, detail = probe_health(port, ready=ready)
    print(detail)
    return 0 if healthy else 1
