"""Wiring for OAuth2 logins: from the settings to the IMAP and SMTP token credentials.

Not yet called by the commands: the IMAP and SMTP adapters take a `TokenCredentials`
once their credentials seam has landed (worker.models' Credentials); then `open_*` in
worker.cli.commands passes these instead of a password when `*_AUTH` is oauth2.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.config.oauth import OAuthSettings
from worker.config.settings import Settings
from worker.errors import ConfigError
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
