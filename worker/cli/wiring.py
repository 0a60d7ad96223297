"""The adapters the commands use, built from settings: logins, mailbox, destination, PDF
inspector, store. Only construction here; what runs them lives beside it in worker.cli."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.config import routes
from worker.config.environment import Secret
from worker.config.settings import Settings
from worker.delivery.getmyinvoices import GmiDestination
from worker.delivery.smtp import SmtpOutbox
from worker.errors import ConfigError, DeliveryRefused, DeliveryUnavailable, StoreError
from worker.faults import Checkpoint, no_checkpoint
from worker.imap.mailbox import ImapMailbox
from worker.mail.trust import TrustPolicy
from worker.models import (
    DEFAULT_ROUTE,
    Credentials,
    DeliveryKind,
    PasswordCredentials,
    smtp_destination,
)
from worker.pdf.pool import PdfInspector
from worker.relay.budget import Budget, SharedBudget
from worker.relay.lease import LEASE_SECONDS
from worker.relay.pollconfig import PipelineConfig
from worker.relay.ports import Destination, MailActionStore
from worker.relay.tidy import MailTidier
from worker.store import migrate
from worker.store.sqlstore import SqlStore
from worker.tokens import AuthMethod


def mailbox_name(settings: Settings) -> str:
    """The audit's name for the polled folder; stable across port or TLS changes."""
    return routes.mailbox_name(settings)


def pipeline_config(
    settings: Settings, *, route: str = DEFAULT_ROUTE, destination: str | None = None
) -> PipelineConfig:
    """One route's poll. `destination` None: `smtp:<forward_to in lower case>`; a route
    delivering through GetMyInvoices passes its account's (`GmiDestination.destination`)
    or its own `destination` key."""
    # A small batch: what a sender frozen mid-batch holds until its leases expire.
    send_batch = 5
    return PipelineConfig(
        route=route,
        destination=destination or smtp_destination(settings.forward_to),
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
        delivery=settings.delivery,
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


def gmi_budget(settings: Settings, store: SqlStore) -> SharedBudget:
    """The API budgets kept in `store`, on its clock (the database's, which every replica
    shares: a replica's own may disagree with another's)."""
    return SharedBudget(
        store=store,
        budget=Budget(
            calls_per_minute=settings.gmi_calls_per_minute,
            calls_per_day=settings.gmi_calls_per_day,
        ),
    )


def gmi_destination(
    settings: Settings, store: SqlStore, *, checkpoint: Checkpoint = no_checkpoint
) -> GmiDestination:
    """The GetMyInvoices API, its budgets and upload marks kept in `store`."""
    pattern = settings.gmi_credit_note_pattern
    return GmiDestination(
        api_key=settings.gmi_api_key or Secret(""),
        budget=gmi_budget(settings, store),
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


def account_destination(settings: Settings, store: SqlStore) -> str:
    """`getmyinvoices:<accountId>` from `GET /account`: the destination of an API route
    whose routes file names none. Raises `DeliveryUnavailable` when the API cannot say."""
    api = gmi_destination(settings, store)
    try:
        api.open()
        return api.destination_name
    except DeliveryRefused as exc:  # a timeout or a refusal of GET /account: an outage
        raise DeliveryUnavailable(str(exc)) from exc
    finally:
        api.close()


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
