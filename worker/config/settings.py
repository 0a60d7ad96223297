"""The only reader of the environment: frozen settings, validated once, secrets masked.

`Settings.from_env` reads an injected mapping (tests pass a dict, the CLI `os.environ`)
and checks every variable before it raises, so a user sees all problems at once: one
`ConfigError` for a single problem, a `ConfigProblems` listing each on its own line for
several. No message ever contains a password or a database URL.
"""

from __future__ import annotations

import enum
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from urllib.parse import unquote

from worker import models
from worker.config import values, web
from worker.config.environment import EnvReader, Secret
from worker.config.oauth import OAuthSettings, read_oauth
from worker.config.schedule import parse_duration, parse_schedule
from worker.config.web import WebUser
from worker.faults import CrashAt
from worker.logs import url_passwords
from worker.models import (
    AfterForward,
    DedupMode,
    DeliveryKind,
    Security,
    sqlite_file,
    sqlite_location,
)
from worker.tokens import AuthMethod

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    imap_host: str
    imap_port: int
    imap_security: Security
    imap_user: str
    imap_password: Secret
    imap_folder: str
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    smtp_user: str | None
    smtp_password: Secret | None
    forward_to: str
    forward_from: str
    database_url: Secret
    schedule: str
    timezone: str
    http_port: int
    since: date | None
    max_sends_per_minute: int | None
    allowed_senders: tuple[str, ...]
    dedup: DedupMode
    keep_pdfs: bool
    ca_file: Path | None
    log_format: str
    timeout_seconds: float = models.DEFAULT_TIMEOUT_SECONDS
    # A whole poll's time on IMAP: a server trickling bytes keeps every single wait
    # under `timeout_seconds` and would otherwise stretch a poll without bound.
    poll_deadline_seconds: float = models.DEFAULT_POLL_DEADLINE_SECONDS
    max_attempts: int = models.DEFAULT_MAX_ATTEMPTS
    max_mail_bytes: int = models.DEFAULT_MAX_MAIL_BYTES
    max_pdf_bytes: int = models.DEFAULT_MAX_PDF_BYTES
    pdf_timeout_seconds: float = models.DEFAULT_PDF_TIMEOUT_SECONDS
    pdf_memory_mb: int = models.DEFAULT_PDF_MEMORY_MB
    error_retries: int = models.DEFAULT_ERROR_RETRIES
    healthy_after_seconds: float | None = None  # None: three schedule intervals
    invoice_number_pattern: str | None = None
    max_parts: int = models.DEFAULT_MAX_PARTS  # MIME parts per mail (docs/security.md)
    max_depth: int = models.DEFAULT_MAX_DEPTH  # MIME nesting levels
    require_dkim: bool = False  # a valid aligned DKIM signature proves From
    dkim_domains: tuple[str, ...] = ()  # signing domains accepted for any From
    trusted_authserv_id: str | None = None  # Authentication-Results trusted from this server
    retry_delay_seconds: float = models.DEFAULT_RETRY_DELAY_SECONDS  # doubles per attempt
    # Test-only (docs/guarantees.md), never set in production: a crash at a named step.
    test_crash_at: CrashAt | None = None
    notify_to: str | None = None  # where failure notices go; None: no notices
    # at most one failure notice this often
    notify_interval_seconds: float = models.DEFAULT_NOTIFY_INTERVAL_SECONDS
    unknown_variables: tuple[str, ...] = ()  # INVOICE_RELAY_* names nobody reads: typos?
    idle: bool = False  # `run` also polls as soon as IMAP IDLE announces new mail
    smtp_sessions: int = 1  # SMTP sessions sending at once; one mail's window each
    # What happens to a settled mail after forwarding; keep: the folder is read-only.
    after_forward: AfterForward = field(default_factory=AfterForward)
    imap_auth: AuthMethod = AuthMethod.PASSWORD
    smtp_auth: AuthMethod = AuthMethod.PASSWORD
    oauth: OAuthSettings | None = None  # set when IMAP or SMTP logs in with oauth2
    secret_key_file: Path | None = None  # encrypts stored tokens (a process setting)
    # The status page (worker.web); None: off (no web user, or WEB_PORT 0).
    web: web.WebSettings | None = None
    # Where documents go: mail to FORWARD_TO, or the GetMyInvoices API (docs/getmyinvoices.md).
    delivery: DeliveryKind = DeliveryKind.SMTP
    gmi_api_key: Secret | None = None  # required for getmyinvoices
    gmi_api_url: str = models.DEFAULT_GMI_API_URL
    gmi_document_type: str = models.DEFAULT_GMI_DOCUMENT_TYPE
    gmi_credit_note_pattern: str | None = models.DEFAULT_GMI_CREDIT_NOTE_PATTERN
    gmi_run_ocr: bool = True
    gmi_tags: tuple[str, ...] = ()
    gmi_calls_per_minute: int = models.DEFAULT_GMI_CALLS_PER_MINUTE
    gmi_calls_per_day: int = models.DEFAULT_GMI_CALLS_PER_DAY

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        stderr_is_tty: bool = False,
        web_users: tuple[WebUser, ...] = (),
    ) -> Settings:
        """Read and check every variable; raise ConfigError naming each one at fault.

        `web_users` are the routes file's `[[web_users]]`: they join the one user of
        INVOICE_RELAY_WEB_PASSWORD."""
        env = EnvReader(environ)
        settings = cls._read(env, stderr_is_tty=stderr_is_tty, web_users=web_users)
        env.raise_problems()
        return settings

    @classmethod
    def _read(
        cls, env: EnvReader, *, stderr_is_tty: bool, web_users: tuple[WebUser, ...]
    ) -> Settings:
        # Read by worker.config.routes, which owns their meaning; named here so that
        # they are not reported as unknown.
        env.raw("CONFIG")
        env.raw("MAX_PARALLEL_POLLS")
        delivery = env.parse("DELIVERY", values.enum_of(DeliveryKind), DeliveryKind.SMTP)
        # With the API, mail goes out only as notices: SMTP is needed only for those.
        smtp_needed = delivery is DeliveryKind.SMTP or env.raw("NOTIFY_TO") is not None
        api = delivery is DeliveryKind.GETMYINVOICES
        imap_security = env.parse("IMAP_SECURITY", values.enum_of(Security), Security.SSL)
        smtp_security = env.parse("SMTP_SECURITY", values.enum_of(Security), Security.STARTTLS)
        imap_auth = env.parse("IMAP_AUTH", values.enum_of(AuthMethod), AuthMethod.PASSWORD)
        smtp_auth = env.parse("SMTP_AUTH", values.enum_of(AuthMethod), AuthMethod.PASSWORD)
        smtp_user = env.text("SMTP_USER")
        oauth, secret_key_file = read_oauth(
            env, imap_auth=imap_auth, smtp_auth=smtp_auth, smtp_user=smtp_user
        )
        keep_pdfs = env.parse("KEEP_PDFS", values.boolean, False)
        settings = cls(
            imap_host=env.parse("IMAP_HOST", values.host, None, required=True) or "",
            imap_port=env.parse("IMAP_PORT", values.port(1), _IMAP_PORTS[imap_security]),
            imap_security=imap_security,
            imap_user=env.required("IMAP_USER"),
            imap_password=env.secret("IMAP_PASSWORD", required=imap_auth is AuthMethod.PASSWORD)
            or Secret(""),
            imap_folder=env.text("IMAP_FOLDER") or "INBOX",
            smtp_host=env.parse("SMTP_HOST", values.host, None, required=smtp_needed) or "",
            smtp_port=env.parse("SMTP_PORT", values.port(1), _SMTP_PORTS[smtp_security]),
            smtp_security=smtp_security,
            smtp_user=smtp_user,
            smtp_password=env.secret("SMTP_PASSWORD", required=False),
            forward_to=env.parse("FORWARD_TO", values.address, None, required=not api) or "",
            forward_from=env.parse("FORWARD_FROM", values.address, None, required=smtp_needed)
            or "",
            database_url=_database_url(env),
            schedule=env.text("SCHEDULE") or "*/5 * * * *",
            timezone=env.parse("TIMEZONE", values.timezone, "UTC"),
            http_port=env.parse("HTTP_PORT", values.port(0), models.DEFAULT_HTTP_PORT),
            since=env.parse("SINCE", values.iso_date, None),
            max_sends_per_minute=env.parse("MAX_SENDS_PER_MINUTE", values.integer(1), None),
            allowed_senders=env.parse("ALLOWED_SENDERS", values.senders, ()),
            dedup=env.parse("DEDUP", values.enum_of(DedupMode), DedupMode.CONTENT),
            keep_pdfs=keep_pdfs,
            ca_file=env.parse("CA_FILE", values.readable_file, None),
            log_format=env.parse(
                "LOG_FORMAT", values.log_format, "text" if stderr_is_tty else "json"
            ),
            timeout_seconds=env.parse(
                "TIMEOUT", values.positive_float, models.DEFAULT_TIMEOUT_SECONDS
            ),
            poll_deadline_seconds=env.parse(
                "POLL_DEADLINE", parse_duration, models.DEFAULT_POLL_DEADLINE_SECONDS
            ),
            max_attempts=env.parse("MAX_ATTEMPTS", values.integer(1), models.DEFAULT_MAX_ATTEMPTS),
            max_mail_bytes=env.parse(
                "MAX_MAIL_BYTES", values.integer(1), models.DEFAULT_MAX_MAIL_BYTES
            ),
            max_pdf_bytes=env.parse(
                "MAX_PDF_BYTES", values.integer(1), models.DEFAULT_MAX_PDF_BYTES
            ),
            pdf_timeout_seconds=env.parse(
                "PDF_TIMEOUT", values.positive_float, models.DEFAULT_PDF_TIMEOUT_SECONDS
            ),
            pdf_memory_mb=env.parse(
                "PDF_MEMORY_MB", values.integer(64), models.DEFAULT_PDF_MEMORY_MB
            ),
            error_retries=env.parse(
                "ERROR_RETRIES", values.integer(0), models.DEFAULT_ERROR_RETRIES
            ),
            healthy_after_seconds=env.parse("HEALTHY_AFTER", parse_duration, None),
            invoice_number_pattern=env.parse("INVOICE_NUMBER_PATTERN", values.pattern, None),
            max_parts=env.parse("MAX_PARTS", values.integer(1), models.DEFAULT_MAX_PARTS),
            max_depth=env.parse("MAX_DEPTH", values.integer(1), models.DEFAULT_MAX_DEPTH),
            require_dkim=env.parse("REQUIRE_DKIM", values.boolean, False),
            dkim_domains=env.parse("DKIM_DOMAINS", values.domains, ()),
            trusted_authserv_id=env.parse("TRUSTED_AUTHSERV_ID", values.authserv_id, None),
            retry_delay_seconds=env.parse(
                "RETRY_DELAY", parse_duration, models.DEFAULT_RETRY_DELAY_SECONDS
            ),
            idle=env.parse("IDLE", values.boolean, False),
            smtp_sessions=env.parse("SMTP_SESSIONS", values.integer(1), 1),
            after_forward=env.parse("AFTER_FORWARD", values.after_forward, AfterForward()),
            test_crash_at=env.parse("TEST_CRASH_AT", CrashAt.from_text, None),
            notify_to=env.parse("NOTIFY_TO", values.address, None),
            notify_interval_seconds=env.parse(
                "NOTIFY_INTERVAL", parse_duration, models.DEFAULT_NOTIFY_INTERVAL_SECONDS
            ),
            imap_auth=imap_auth,
            smtp_auth=smtp_auth,
            oauth=oauth,
            secret_key_file=secret_key_file,
            web=web.read_web_settings(
                env, secret_key_file, keep_pdfs=keep_pdfs, extra_users=web_users
            ),
            delivery=delivery,
            gmi_api_key=env.secret("GMI_API_KEY", required=api),
            gmi_api_url=env.parse("GMI_API_URL", values.http_url, models.DEFAULT_GMI_API_URL),
            gmi_document_type=env.parse(
                "GMI_DOCUMENT_TYPE", values.gmi_document_type, models.DEFAULT_GMI_DOCUMENT_TYPE
            ),
            gmi_credit_note_pattern=env.parse(
                "GMI_CREDIT_NOTE_PATTERN", values.pattern, models.DEFAULT_GMI_CREDIT_NOTE_PATTERN
            ),
            gmi_run_ocr=env.parse("GMI_RUN_OCR", values.boolean, True),
            gmi_tags=env.parse("GMI_TAGS", values.tags, ()),
            gmi_calls_per_minute=env.parse(
                "GMI_CALLS_PER_MINUTE", values.integer(1), models.DEFAULT_GMI_CALLS_PER_MINUTE
            ),
            gmi_calls_per_day=env.parse(
                "GMI_CALLS_PER_DAY", values.integer(1), models.DEFAULT_GMI_CALLS_PER_DAY
            ),
            unknown_variables=env.unknown(),
        )
        if smtp_auth is AuthMethod.PASSWORD and (
            (settings.smtp_user is None) != (settings.smtp_password is None)
        ):
            missing = "SMTP_PASSWORD" if settings.smtp_password is None else "SMTP_USER"
            env.fail(missing, "required when the other half of the SMTP login is set")
        try:
            parse_schedule(settings.schedule, settings.timezone)
        except ValueError as exc:
            env.fail("SCHEDULE", str(exc))
        return settings

    def sqlite_path(self) -> Path | None:
        """The SQLite database file (the CLI creates its directory); None otherwise."""
        return sqlite_file(self.database_url.reveal())

    def describe(self) -> dict[str, str]:
        """Every setting as text, secrets masked: for `check` output and start-up logs."""
        return {item.name: _describe(getattr(self, item.name)) for item in fields(self)}

    def secret_values(self) -> tuple[str, ...]:
        """The strings logging must redact: passwords, also inside the database URL."""
        values = [self.imap_password.reveal()]
        if self.web is not None:
            values.extend(user.password for user in self.web.users)
        if self.smtp_password is not None:
            values.append(self.smtp_password.reveal())
        if self.oauth is not None:
            for secret in (self.oauth.client_secret, self.oauth.refresh_token):
                if secret is not None:
                    values.append(secret.reveal())
        if self.gmi_api_key is not None:
            values.append(self.gmi_api_key.reveal())
        for password in url_passwords(self.database_url.reveal()):
            values.extend((password, unquote(password)))
        return tuple(dict.fromkeys(value for value in values if value))


@functools.cache
def setting_names() -> frozenset[str]:
    """Every name `Settings.from_env` reads, without the prefix (the `_FILE` forms of
    secrets included): the keys a routes file may use."""
    env = EnvReader({})
    Settings._read(env, stderr_is_tty=False, web_users=())
    return env.names_read()


def database_url_from_env(environ: Mapping[str, str]) -> Secret:
    """Only the database URL (with its default), for commands that need nothing else."""
    env = EnvReader(environ)
    url = _database_url(env)
    env.raise_problems()
    return url


def http_port_from_env(environ: Mapping[str, str]) -> int:
    """Only INVOICE_RELAY_HTTP_PORT, for the container's health probe."""
    env = EnvReader(environ)
    port = env.parse("HTTP_PORT", values.port(0), models.DEFAULT_HTTP_PORT)
    env.raise_problems()
    return port


_IMAP_PORTS = {Security.SSL: 993, Security.STARTTLS: 143, Security.NONE: 143}
_SMTP_PORTS = {Security.SSL: 465, Security.STARTTLS: 587, Security.NONE: 25}


def _database_url(env: EnvReader) -> Secret:
    url = env.raw("DATABASE_URL")
    if url is None:
        return Secret.url(_default_database_url(env))
    if not _URL.match(url):
        env.fail(
            "DATABASE_URL",
            "not a URL such as sqlite:////var/lib/invoice-relay/relay.db "
            "or postgresql+psycopg://user:password@host/dbname",
        )
    else:
        location = sqlite_location(url)
        if location not in (None, "", ":memory:") and not os.path.isabs(location or ""):
            env.fail(
                "DATABASE_URL",
                "the SQLite path must be absolute, as in sqlite:////var/lib/relay.db "
                "(four slashes): cron runs from any directory",
            )
    return Secret.url(url)


def _default_database_url(env: EnvReader) -> str:
    # XDG_DATA_HOME and HOME belong to the environment too: read them from the same mapping.
    data_home = env.outside("XDG_DATA_HOME")
    if not os.path.isabs(data_home):
        home = env.outside("HOME")
        if not os.path.isabs(home):
            env.fail(
                "DATABASE_URL",
                "not set, and neither XDG_DATA_HOME nor HOME gives a place for the "
                "default SQLite file: set INVOICE_RELAY_DATABASE_URL",
            )
            return "sqlite://"
        data_home = os.path.join(home, ".local", "share")
    return "sqlite:///" + os.path.join(data_home, "invoice-relay", "relay.db")


def _describe(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)
