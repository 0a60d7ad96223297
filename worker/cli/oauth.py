"""Wiring for OAuth2 logins: from the settings to the IMAP and SMTP token credentials,
and the `oauth status` and `oauth login` commands.

worker.cli.wiring's `logins` hands these to the adapters (as worker.models'
Credentials) when `*_AUTH` is oauth2, and closes the token sources when the command ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from worker.auth.crypto import Sealer
from worker.auth.http import TimeBudget
from worker.auth.login import redirected_query
from worker.auth.sources import OAuthClient, TokenSources
from worker.config.oauth import OAuthSettings
from worker.config.settings import Settings
from worker.errors import ConfigError, OAuthLoginRefused
from worker.store.sqlstore import SqlStore
from worker.store.tokens import TokenStore
from worker.tokens import AuthMethod, TokenCredentials


def oauth_client(oauth: OAuthSettings) -> OAuthClient:
    """The settings as the plain values worker.auth takes (secrets revealed only here)."""
    return OAuthClient(
        provider=oauth.provider,
        flow=oauth.flow,
        tenant=oauth.tenant,
        client_id=oauth.client_id,
        client_secret=oauth.client_secret.reveal() if oauth.client_secret else None,
        client_cert_file=oauth.client_cert_file,
        service_account_file=oauth.service_account_file,
        refresh_token=oauth.refresh_token.reveal() if oauth.refresh_token else None,
        authority=oauth.authority,
        token_url=oauth.token_url,
        authorize_url=oauth.authorize_url,
        scopes=oauth.scopes,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthLogins:
    """The token credentials each protocol logs in with; None where it uses a password."""

    imap: TokenCredentials | None
    smtp: TokenCredentials | None
    sources: TokenSources  # close() when the command ends


def oauth_logins(
    settings: Settings, store: SqlStore, *, route: str = "the default route"
) -> OAuthLogins | None:
    """None when neither IMAP nor SMTP logs in with oauth2. Reads the key file and the
    service account or certificate files now, so a bad one fails at start-up."""
    if settings.oauth is None:
        return None
    if settings.secret_key_file is None:  # Settings checked it; this keeps mypy honest
        raise ConfigError("INVOICE_RELAY_SECRET_KEY_FILE", "required for oauth2")
    sources = TokenSources(
        rows=TokenStore(store.engine),
        sealer=Sealer.from_file(settings.secret_key_file),
        ca_file=settings.ca_file,
        timeout_seconds=settings.timeout_seconds,
    )
    client = oauth_client(settings.oauth)
    try:
        imap = (
            TokenCredentials(
                user=settings.imap_user,
                tokens=sources.source(client, user=settings.imap_user, route=route),
            )
            if settings.imap_auth is AuthMethod.OAUTH2
            else None
        )
        smtp_user = settings.smtp_user
        smtp = (
            TokenCredentials(
                user=smtp_user, tokens=sources.source(client, user=smtp_user, route=route)
            )
            if settings.smtp_auth is AuthMethod.OAUTH2 and smtp_user is not None
            else None
        )
    except BaseException:
        sources.close()
        raise
    return OAuthLogins(imap=imap, smtp=smtp, sources=sources)


def status_lines(settings: Settings, store: SqlStore) -> list[str]:
    """`invoice-relay oauth status`: per protocol that logs in with oauth2, the flow,
    the identity and when its token was last refreshed; never a token or a secret."""
    logins = oauth_logins(settings, store)
    if logins is None or settings.oauth is None:
        return ["no protocol logs in with oauth2 (INVOICE_RELAY_IMAP_AUTH, _SMTP_AUTH)"]
    oauth = settings.oauth
    rows = TokenStore(store.engine)
    lines = []
    try:
        for protocol, credentials in (("imap", logins.imap), ("smtp", logins.smtp)):
            if credentials is None:
                continue
            identity = logins.sources.source(oauth_client(oauth), user=credentials.user).identity
            row = rows.read_token(identity.key())
            if row is None or row.refreshed_at is None:
                when = "no token stored yet"
            else:
                until = row.access_expires_at.isoformat() if row.access_expires_at else "-"
                when = f"refreshed {row.refreshed_at.isoformat()}, access token until {until}"
            lines.append(
                f"{protocol}: {oauth.provider.value} {oauth.flow.value} as {credentials.user}"
                f" (client {identity.client_id or '-'}"
                f"{', tenant ' + identity.tenant if identity.tenant else ''}): {when}"
            )
    finally:
        logins.sources.close()
    return lines


class _Redirects:
    """The loopback end of the sign-in: a one-page HTTP server on 127.0.0.1 that hands
    the redirected URL's query to `oauth login`, which also accepts it pasted."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, str]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """The query holds the code: never logged."""

            def do_GET(self) -> None:
                query = redirected_query(urlsplit(self.path).query)
                if "code" not in query and "error" not in query:
                    self.send_error(404)
                    return
                received.put(query)
                page = b"invoice-relay: signed in. You can close this window.\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def redirect_uri(self) -> str:
        # Microsoft ignores the port of a localhost redirect URI: register http://localhost.
        return f"http://localhost:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def login(
    settings: Settings,
    store: SqlStore,
    *,
    show: Callable[[str], None],
    pasted: Callable[[], str],
    wait_seconds: float = 600.0,
    route: str = "the default route",
) -> str:
    """`invoice-relay oauth login`: print the URL, take the redirect (on 127.0.0.1, or
    pasted), store the refresh token. Returns the user signed in for."""
    oauth = settings.oauth
    if oauth is None or settings.secret_key_file is None:
        raise ConfigError("INVOICE_RELAY_IMAP_AUTH", "oauth login needs IMAP or SMTP on oauth2")
    user = settings.imap_user if settings.imap_auth is AuthMethod.OAUTH2 else settings.smtp_user
    sources = TokenSources(
        rows=TokenStore(store.engine),
        sealer=Sealer.from_file(settings.secret_key_file),
        ca_file=settings.ca_file,
        timeout_seconds=settings.timeout_seconds,
    )
    redirects = _Redirects()
    try:
        sign_in, source = sources.login(oauth_client(oauth), user=user or "", route=route)
        url = sign_in.start(
            redirect_uri=redirects.redirect_uri,
            deadline=TimeBudget(seconds=settings.timeout_seconds),
        )
        show(
            "Open this URL in a browser and sign in as the mailbox's user:\n"
            f"  {url}\n"
            "If the browser is on another machine, it ends on a page that does not load:\n"
            "paste that page's address here and press Enter."
        )

        def read_pasted() -> None:
            while True:
                line = pasted()
                if not line:  # end of input: only the loopback redirect can come now
                    return
                query = redirected_query(line)
                if "code" in query or "error" in query:
                    redirects.received.put(query)
                    return

        threading.Thread(target=read_pasted, daemon=True).start()
        try:
            response = redirects.received.get(timeout=wait_seconds)
        except queue.Empty as exc:
            raise OAuthLoginRefused(
                f"no sign-in arrived within {wait_seconds:.0f} s", route=route
            ) from exc
        grant = sign_in.finish(response, TimeBudget(seconds=settings.timeout_seconds))
        source.save_login(grant)
        return user or ""
    finally:
        redirects.close()
        sources.close()
