"""`invoice-relay check`: try each server with the real settings, one line per check."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TextIO

from worker.cli.wiring import (
    Logins,
    gmi_destination,
    imap_mailbox,
    logins,
    password_logins,
    smtp_outbox,
)
from worker.config.routes import Deployment, Route
from worker.config.settings import Settings
from worker.errors import (
    AfterForwardImpossible,
    DeliveryRefused,
    DestinationRefused,
    MailboxError,
    MailboxFolderError,
    MailboxLoginError,
    MailboxTokenRefused,
    OAuthClientRejected,
    OAuthLoginRefused,
    OutboxError,
    RelayError,
    StoreError,
    TokenEndpointError,
)
from worker.models import DeliveryKind, MailActionMode
from worker.relay.settled import MoveSupport, move_problem, move_support
from worker.store import migrate
from worker.store.sqlstore import SqlStore
from worker.tokens import AuthMethod

# What to change, by server and by the kind of failure its message names.
_IMAP_TLS = "check INVOICE_RELAY_IMAP_SECURITY (ssl, starttls, none) and INVOICE_RELAY_CA_FILE"
_IMAP_REACH = (
    "check INVOICE_RELAY_IMAP_HOST and INVOICE_RELAY_IMAP_PORT, and that the server runs "
    "and a firewall lets the relay reach it"
)
_SMTP_TLS = "check INVOICE_RELAY_SMTP_SECURITY (ssl, starttls, none) and INVOICE_RELAY_CA_FILE"
_SMTP_REACH = (
    "check INVOICE_RELAY_SMTP_HOST and INVOICE_RELAY_SMTP_PORT, and that the server runs "
    "and a firewall lets the relay reach it"
)
_TLS_WORDS = ("tls", "ssl", "certificate", "handshake")


def advice(error: RelayError) -> str:
    """How to fix what `error` says is wrong: one short clause naming the settings."""
    # The detail only: a class's own message lists every cause it may have.
    text = (error.detail or "").lower()
    if isinstance(error, AfterForwardImpossible):
        return (
            "create the folder on the server, or set INVOICE_RELAY_AFTER_FORWARD to "
            "keep, seen or flag"
        )
    if isinstance(error, MailboxTokenRefused):
        return (
            "see docs/oauth.md: the app needs IMAP.AccessAsApp with admin consent, a service "
            "principal (New-ServicePrincipal with the Enterprise applications object id) and "
            "Add-MailboxPermission on INVOICE_RELAY_IMAP_USER; for Google, domain-wide "
            "delegation of https://mail.google.com/"
        )
    if isinstance(error, MailboxLoginError):
        return (
            "check INVOICE_RELAY_IMAP_USER and INVOICE_RELAY_IMAP_PASSWORD "
            "(or INVOICE_RELAY_IMAP_PASSWORD_FILE)"
        )
    if isinstance(error, MailboxFolderError):
        return (
            "create the folder, or set INVOICE_RELAY_IMAP_FOLDER to an existing one "
            "(names are case-sensitive; subfolders as the server writes them, e.g. INBOX/Invoices)"
        )
    if isinstance(error, MailboxError):
        return _IMAP_TLS if any(word in text for word in _TLS_WORDS) else _IMAP_REACH
    if isinstance(error, OutboxError):
        if "oauth2 login" in text:
            return (
                "see docs/oauth.md: the app needs SMTP.SendAsApp with admin consent, SMTP AUTH "
                "enabled on INVOICE_RELAY_SMTP_USER's mailbox, and Send As for FORWARD_FROM"
            )
        if "login" in text or "auth" in text:
            return (
                "check INVOICE_RELAY_SMTP_USER and INVOICE_RELAY_SMTP_PASSWORD "
                "(or INVOICE_RELAY_SMTP_PASSWORD_FILE)"
            )
        if "sender" in text:
            return "check INVOICE_RELAY_FORWARD_FROM: the server must let the login send as it"
        if "recipient" in text:
            return "check the address the server refused"
        return _SMTP_TLS if any(word in text for word in _TLS_WORDS) else _SMTP_REACH
    if isinstance(error, StoreError):
        return "check INVOICE_RELAY_DATABASE_URL, and that the database server runs"
    if isinstance(error, DestinationRefused):
        return "check INVOICE_RELAY_GMI_API_KEY and the key's permissions in GetMyInvoices"
    if isinstance(error, OAuthLoginRefused):
        return "run `invoice-relay oauth login`, or replace INVOICE_RELAY_OAUTH_REFRESH_TOKEN"
    if isinstance(error, OAuthClientRejected):
        return (
            "check INVOICE_RELAY_OAUTH_CLIENT_ID and INVOICE_RELAY_OAUTH_CLIENT_SECRET "
            "(or _CLIENT_CERT_FILE); client secrets expire"
        )
    if isinstance(error, TokenEndpointError):
        return (
            "check INVOICE_RELAY_OAUTH_AUTHORITY (or _TOKEN_URL) and INVOICE_RELAY_CA_FILE, "
            "and that the relay can reach the token endpoint"
        )
    return "see the message above"


def _check_gmi(settings: Settings) -> str:
    """`GET /account`: the key works, and which account the documents go to."""
    from worker.store.sqlstore import SqlStore

    store = SqlStore("sqlite://")  # a check spends no budget and marks nothing
    api = gmi_destination(settings, store)
    try:
        account = api.account()
    finally:
        api.close()
        store.close()
    return f"the API key works for account {account.account_id} ({account.name or 'unnamed'})"


@contextmanager
def _logins(settings: Settings) -> Iterator[Logins]:
    """The logins a poll would use; OAuth2 tokens come from (and go to) the database."""
    if settings.oauth is None:
        yield password_logins(settings)
        return
    from worker.store.sqlstore import SqlStore

    url = settings.database_url.reveal()
    path = settings.sqlite_path()
    if (path is not None and not path.exists()) or not migrate.is_up_to_date(url):
        raise StoreError(
            "not tried: the oauth2 login's tokens are kept in the database, which is not "
            "migrated yet (run `invoice-relay db upgrade`)"
        )
    store = SqlStore(url)
    try:
        with logins(settings, store) as made:
            yield made
    finally:
        store.close()


def _check_imap(settings: Settings) -> str:
    with _logins(settings) as made:
        mailbox = imap_mailbox(settings, made)
        try:
            status = mailbox.open()
        finally:
            mailbox.close()
    how = " with oauth2" if settings.imap_auth is AuthMethod.OAUTH2 else ""
    return (
        f"logged in{how} as {settings.imap_user} at {settings.imap_host}:{settings.imap_port}; "
        f"folder {settings.imap_folder!r} holds {status.exists} mail(s)"
    )


def _check_after_forward(settings: Settings) -> str:
    """INVOICE_RELAY_AFTER_FORWARD other than keep: seen and flag need the folder
    SELECTable; move also needs MOVE or UIDPLUS and the target folder. Changes nothing."""
    after = settings.after_forward
    with _logins(settings) as made:
        mailbox = imap_mailbox(settings, made)
        try:
            mailbox.open_for_actions()
            if after.mode is not MailActionMode.MOVE:
                return f"{after}: the folder {settings.imap_folder!r} can be SELECTed read-write"
            folder = after.folder or ""
            support = move_support(mailbox.capabilities())
            exists = support is not MoveSupport.NONE and mailbox.folder_exists(folder)
        finally:
            mailbox.close()
    problem = move_problem(support, folder=folder, folder_exists=exists)
    if problem is not None:
        raise AfterForwardImpossible(problem)
    how = "MOVE" if support is MoveSupport.MOVE else "COPY and UID EXPUNGE (UIDPLUS)"
    return f"{after}: settled mail is moved to {folder!r} with {how}"


def _check_smtp(settings: Settings) -> str:
    with _logins(settings) as made:
        outbox = smtp_outbox(settings, made)
        try:
            outbox.open()
        finally:
            outbox.close()
    how = " with oauth2" if settings.smtp_auth is AuthMethod.OAUTH2 else ""
    login = f"{how} as {settings.smtp_user}" if settings.smtp_user else ""
    return f"connected{login} to {settings.smtp_host}:{settings.smtp_port}"


def _check_database(settings: Settings) -> str:
    url = settings.database_url.reveal()
    path = settings.sqlite_path()
    if path is not None and not path.exists():
        # A check changes nothing: the first poll creates the file.
        return f"no database at {path} yet; the first poll creates it"
    if migrate.is_up_to_date(url):
        return "reachable, migrations up to date"
    return "reachable; migrations pending (applied at start-up, or run `invoice-relay db upgrade`)"


def _check_oauth(settings: Settings) -> str:
    """A token for each protocol that logs in with oauth2. It is stored like any other
    (a rotated refresh token must never be lost), so this needs the migrated database."""
    from worker.cli.oauth import oauth_logins  # MSAL and google-auth only when used
    from worker.store.sqlstore import SqlStore

    url = settings.database_url.reveal()
    path = settings.sqlite_path()
    if (path is not None and not path.exists()) or not migrate.is_up_to_date(url):
        return "not tried: tokens are stored in the database, which is not migrated yet"
    store = SqlStore(url)
    try:
        logins = oauth_logins(settings, store)
        if logins is None:
            return "not used"
        try:
            parts = []
            for protocol, credentials in (("imap", logins.imap), ("smtp", logins.smtp)):
                if credentials is not None:
                    token = credentials.tokens.access_token()
                    until = token.expires_at.isoformat(timespec="seconds")
                    parts.append(f"{protocol} token for {credentials.user} until {until}")
            return "; ".join(parts)
        finally:
            logins.sources.close()
    finally:
        store.close()


def test_message(settings: Settings, address: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.forward_from
    message["To"] = address
    message["Subject"] = "invoice-relay test mail"
    message["Auto-Submitted"] = "auto-generated"
    message["Date"] = datetime.now(UTC)
    message.set_content(
        "This is a test mail from `invoice-relay check --send-test`.\n"
        "It proves that the relay can send with its SMTP settings.\n"
    )
    return message


def _send_test(settings: Settings, address: str) -> str:
    with _logins(settings) as made:
        outbox = smtp_outbox(settings, made)
        try:
            outbox.open()
            answer = outbox.send(test_message(settings, address), recipient=address)
        except DeliveryRefused as exc:
            raise RelayError(f"test mail refused: {exc}") from exc
        finally:
            outbox.close()
    return f"test mail to {address} accepted: {answer}"


def run_checks(settings: Settings, *, send_test: str | None, out: TextIO) -> int:
    checks: list[tuple[str, Callable[[Settings], str]]] = [("imap", _check_imap)]
    if settings.after_forward.changes_mailbox:  # keep needs nothing beyond reading
        checks.append(("after-forward", _check_after_forward))
    if settings.delivery is DeliveryKind.GETMYINVOICES:
        checks.append(("getmyinvoices", _check_gmi))
    if settings.delivery is DeliveryKind.SMTP or settings.notify_to:
        checks.append(("smtp", _check_smtp))
    checks.append(("database", _check_database))
    if settings.oauth is not None:
        checks.insert(0, ("oauth2", _check_oauth))
    failed = 0
    for name, check in checks:
        try:
            detail = check(settings)
        except RelayError as exc:
            failed += 1
            out.write(f"FAIL {name}: {exc}; to fix: {advice(exc)}\n")
        else:
            out.write(f"ok   {name}: {detail}\n")
    if send_test:
        try:
            out.write(f"ok   send-test: {_send_test(settings, send_test)}\n")
        except RelayError as exc:
            failed += 1
            out.write(f"FAIL send-test: {exc}; to fix: {advice(exc)}\n")
    return 1 if failed else 0


def check_routes(
    deployment: Deployment, routes: Sequence[Route], *, send_test: str | None, out: TextIO
) -> int:
    """`check` for every route (or the one asked for); 1 when anything failed. With a
    routes file each route's lines follow a `route NAME` heading, and destinations that
    still hold pending documents but have no route left are reported."""
    if deployment.config_file is None:
        return run_checks(routes[0].settings, send_test=send_test, out=out)
    failed = 0
    for route in routes:
        out.write(f"route {route.name} ({route.mailbox}):\n")
        failed += run_checks(route.settings, send_test=send_test, out=out)
    failed += _check_orphans(deployment, out)
    return 1 if failed else 0


def _check_orphans(deployment: Deployment, out: TextIO) -> int:
    """Pending documents whose route was removed: nobody will deliver them."""
    path = deployment.process.sqlite_path()
    url = deployment.process.database_url.reveal()
    try:
        if (path is not None and not path.exists()) or not migrate.is_up_to_date(url):
            return 0  # no data yet (a check creates nothing): the database check says so
        store = SqlStore(url)
    except RelayError:
        return 0  # the database check of each route said why already
    try:
        orphans = store.orphaned_destinations([route.mailbox for route in deployment.routes])
    except RelayError:
        return 0
    finally:
        store.close()
    for destination, pending in orphans:
        out.write(
            f"FAIL routes: {pending} pending document(s) for {destination} came from a "
            "mailbox no route polls any more; to fix: put the route back, or "
            "`invoice-relay purge --route NAME` to give them up\n"
        )
    return 1 if orphans else 0
