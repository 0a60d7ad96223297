"""The commands behind the CLI: build the adapters from settings and run one job."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from worker import db
from worker.errors import StoreError
from worker.mailbox import ImapMailbox
from worker.models import AuditFilter, AuditRow, PollReport
from worker.outbox import SendPacer, SmtpOutbox
from worker.pdf import PdfInspector
from worker.pipeline import Pipeline, PipelineConfig, PlannedSighting
from worker.settings import Settings, http_port_from_env
from worker.store import SqlStore

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_SECONDS = 8.0


def mailbox_name(settings: Settings) -> str:
    """The audit's name for the polled folder; stable across port or TLS changes."""
    return f"{settings.imap_user}@{settings.imap_host}/{settings.imap_folder}"


def pipeline_config(settings: Settings) -> PipelineConfig:
    # A lease must outlast the whole send of every document claimed with it, or a
    # slow send would be repeated by another replica: ten sends of several timeouts.
    send_batch = 10
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
        max_attempts=settings.max_attempts,
        error_retries=settings.error_retries,
        lease_seconds=(send_batch + 1) * 4 * settings.timeout_seconds + 60,
        send_batch=send_batch,
    )


def imap_mailbox(settings: Settings) -> ImapMailbox:
    return ImapMailbox(
        host=settings.imap_host,
        port=settings.imap_port,
        security=settings.imap_security,
        user=settings.imap_user,
        password=settings.imap_password.reveal(),
        folder=settings.imap_folder,
        ca_file=settings.ca_file,
        timeout=settings.timeout_seconds,
    )


def smtp_outbox(settings: Settings) -> SmtpOutbox:
    return SmtpOutbox(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        user=settings.smtp_user,
        password=settings.smtp_password.reveal() if settings.smtp_password else None,
        forward_from=settings.forward_from,
        forward_to=settings.forward_to,
        ca_file=settings.ca_file,
        timeout=settings.timeout_seconds,
    )


def pdf_inspector(settings: Settings) -> PdfInspector:
    return PdfInspector(
        timeout_seconds=settings.pdf_timeout_seconds,
        memory_limit_bytes=settings.pdf_memory_mb * 1024 * 1024,
        invoice_pattern=settings.invoice_number_pattern,
    )


def prepared_store(settings: Settings) -> SqlStore:
    """The store, with its SQLite folder created and migrations applied."""
    path = settings.sqlite_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    url = settings.database_url.reveal()
    db.upgrade_database(url)
    return SqlStore(url)


@contextmanager
def _pipeline(
    settings: Settings,
    store: SqlStore,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
) -> Iterator[Pipeline]:
    inspector = pdf_inspector(settings)
    try:
        yield Pipeline(
            config=pipeline_config(settings),
            mailbox=imap_mailbox(settings),
            outbox=smtp_outbox(settings),
            store=store,
            inspector=inspector,
            pacer=SendPacer(settings.max_sends_per_minute),
            stop=stop,
            progress=progress,
        )
    finally:
        inspector.close()


def poll_once(
    settings: Settings,
    store: SqlStore,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
) -> PollReport:
    name = mailbox_name(settings)
    with store.poll_lock(name) as acquired:
        if not acquired:
            now = datetime.now(UTC)
            log.info(
                "another replica holds the poll lock of %s",
                name,
                extra={"action": "poll_locked", "mailbox": name},
            )
            return PollReport(mailbox=name, started_at=now, finished_at=now, locked=True)
        with _pipeline(settings, store, stop=stop, progress=progress) as pipeline:
            return pipeline.poll()


def once(settings: Settings, *, progress: Callable[[str], None] | None = None) -> PollReport:
    store = prepared_store(settings)
    try:
        return poll_once(settings, store, progress=progress)
    finally:
        store.close()


def dry_run(settings: Settings) -> list[PlannedSighting]:
    """What `once` would record now. Writes nothing: on a database that was never
    migrated, an empty in-memory one stands in for it."""
    url = settings.database_url.reveal()
    path = settings.sqlite_path()
    try:
        # Opening a missing SQLite file would create it: a dry run must not.
        up_to_date = (path is None or path.exists()) and db.is_up_to_date(url)
    except StoreError:
        up_to_date = False
    if up_to_date:
        store = SqlStore(url)
    else:
        store = SqlStore("sqlite://")
        db.create_schema(store.engine)
    try:
        with _pipeline(settings, store) as pipeline:
            return pipeline.plan()
    finally:
        store.close()


def run_service(settings: Settings) -> int:
    from worker.metrics import RelayMetrics
    from worker.schedule import build_trigger, interval_hint, parse_schedule
    from worker.service import Service

    spec = parse_schedule(settings.schedule, settings.timezone)
    stop = threading.Event()
    store = _store_with_backoff(settings, stop)
    if store is None:
        return 0
    healthy_after = settings.healthy_after_seconds or 3 * interval_hint(spec) + 60
    try:
        service = Service(
            poll=lambda: poll_once(settings, store, stop=stop),
            trigger=build_trigger(spec),
            http_port=settings.http_port,
            healthy_after_seconds=healthy_after,
            stop_event=stop,
            metrics=RelayMetrics(),
        )
        return service.run()
    finally:
        store.close()


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
    parsed = db.parse_url(url)
    location = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if location and not Path(location).exists():
        raise StoreError(f"no database at {location} yet (run `invoice-relay once` first)")
    if db.current_revision(url) is None:
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


def upgrade(url: str) -> None:
    db.upgrade_database(url)


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


def healthcheck(environ: Mapping[str, str], *, ready: bool) -> int:
    from worker.service import probe_health

    healthy, detail = probe_health(http_port_from_env(environ), ready=ready)
    print(detail)
    return 0 if healthy else 1
