"""Token sources by flow: what the composition root (worker.cli) asks for, per mailbox user.

One `TokenSources` holds the HTTP client (and so its TLS trust and connection pool) for
every identity of the process; each `source()` is a `worker.tokens.TokenSource` whose
tokens live sealed in the store, shared with every other process on the same identity.
The arguments are plain values, not worker.config's settings: the adapters do not
import the configuration layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from worker.auth.cache import StoredTokenSource
from worker.auth.crypto import Sealer
from worker.auth.google import (
    GOOGLE_SCOPE,
    GOOGLE_TOKEN_URL,
    GoogleServiceAccount,
    RefreshGrant,
    read_service_account,
)
from worker.auth.grants import Grantor
from worker.auth.http import host_of, make_client
from worker.auth.login import (
    GOOGLE_AUTHORIZE_URL,
    GOOGLE_PARAMETERS,
    CodeLogin,
    MicrosoftLogin,
    SignIn,
)
from worker.auth.microsoft import (
    DELEGATED_SCOPES,
    MicrosoftApp,
    MicrosoftClient,
    MicrosoftDelegated,
    read_certificate,
)
from worker.errors import ConfigError
from worker.tokens import OAuthFlow, OAuthProvider, TokenIdentity, TokenRows


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class OAuthClient:
    """One route's OAuth2 settings as plain values (from worker.config.oauth.OAuthSettings)."""

    provider: OAuthProvider
    flow: OAuthFlow
    tenant: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    client_cert_file: Path | None = None
    service_account_file: Path | None = None
    refresh_token: str | None = None
    authority: str = "https://login.microsoftonline.com"
    token_url: str | None = None
    authorize_url: str | None = None  # `oauth login`: google's by default
    scopes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"OAuthClient(provider={self.provider.value}, flow={self.flow.value}, "
            f"tenant={self.tenant!r}, client_id={self.client_id!r})"
        )


class TokenSources:
    """Makes the token source of each (route, user); closes the shared HTTP client."""

    def __init__(
        self,
        *,
        rows: TokenRows,
        sealer: Sealer,
        ca_file: Path | None,
        timeout_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._rows = rows
        self._sealer = sealer
        self._timeout = timeout_seconds
        self._clock = clock
        self._http = make_client(ca_file=ca_file)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TokenSources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def source(
        self, client: OAuthClient, *, user: str, route: str = "the default route"
    ) -> StoredTokenSource:
        """The token source for `user` (the mailbox: IMAP_USER or SMTP_USER)."""
        grantor, identity = self._grantor(client, user=user, route=route)
        return StoredTokenSource(
            identity=identity,
            grantor=grantor,
            rows=self._rows,
            sealer=self._sealer,
            timeout_seconds=self._timeout,
            configured_refresh_token=(
                client.refresh_token if client.flow is OAuthFlow.DELEGATED else None
            ),
            clock=self._clock,
        )

    def login(
        self, client: OAuthClient, *, user: str, route: str = "the default route"
    ) -> tuple[SignIn, StoredTokenSource]:
        """A sign-in for `oauth login` (the delegated flow), and the source whose row it
        fills."""
        if client.flow is not OAuthFlow.DELEGATED:
            raise ConfigError(
                "INVOICE_RELAY_OAUTH_FLOW",
                f"`oauth login` signs in for the delegated flow, not {client.flow.value}",
            )
        source = self.source(client, user=user, route=route)
        if client.provider is OAuthProvider.MICROSOFT:
            microsoft = MicrosoftClient(
                authority=client.authority,
                tenant=client.tenant or "common",
                client_id=client.client_id or "",
                client_secret=client.client_secret,
            )
            sign_in: SignIn = MicrosoftLogin(
                microsoft,
                self._http,
                route=route,
                clock=self._clock,
                scopes=client.scopes or DELEGATED_SCOPES,
            )
            return sign_in, source
        google = client.provider is OAuthProvider.GOOGLE
        authorize_url = client.authorize_url or (GOOGLE_AUTHORIZE_URL if google else None)
        if authorize_url is None:
            raise ConfigError(
                "INVOICE_RELAY_OAUTH_AUTHORIZE_URL",
                "required for `oauth login` with a generic provider",
            )
        sign_in = CodeLogin(
            self._http,
            authorize_url=authorize_url,
            token_url=self._token_url(client),
            client_id=client.client_id or "",
            client_secret=client.client_secret,
            scopes=client.scopes or ((GOOGLE_SCOPE,) if google else ()),
            route=route,
            clock=self._clock,
            parameters=GOOGLE_PARAMETERS if google else None,
        )
        return sign_in, source

    @staticmethod
    def _token_url(client: OAuthClient) -> str:
        token_url = client.token_url or (
            GOOGLE_TOKEN_URL if client.provider is OAuthProvider.GOOGLE else None
        )
        if token_url is None:
            raise ConfigError("INVOICE_RELAY_OAUTH_TOKEN_URL", "required for a generic provider")
        return token_url

    @property
    def timeout_seconds(self) -> float:
        return self._timeout

    def _grantor(
        self, client: OAuthClient, *, user: str, route: str
    ) -> tuple[Grantor, TokenIdentity]:
        if client.provider is OAuthProvider.MICROSOFT:
            microsoft = MicrosoftClient(
                authority=client.authority,
                tenant=client.tenant or "common",
                client_id=client.client_id or "",
                client_secret=client.client_secret,
                certificate_pem=(
                    read_certificate(client.client_cert_file)
                    if client.client_cert_file is not None
                    else None
                ),
            )
            identity = TokenIdentity(
                provider=client.provider,
                tenant=microsoft.tenant,
                client_id=microsoft.client_id,
                user=user,
            )
            if client.flow is OAuthFlow.APP:
                return MicrosoftApp(microsoft, self._http, route=route, clock=self._clock), identity
            delegated = MicrosoftDelegated(
                microsoft,
                self._http,
                route=route,
                clock=self._clock,
                scopes=client.scopes or DELEGATED_SCOPES,
            )
            return delegated, identity
        if client.flow is OAuthFlow.SERVICE_ACCOUNT:
            if client.service_account_file is None:
                raise ConfigError("INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE", "required")
            info = read_service_account(client.service_account_file)
            account = GoogleServiceAccount(
                info,
                self._http,
                subject=user,
                token_url=client.token_url,
                scopes=client.scopes or (GOOGLE_SCOPE,),
                route=route,
                clock=self._clock,
            )
            identity = TokenIdentity(
                provider=client.provider, tenant="", client_id=str(info["client_email"]), user=user
            )
            return account, identity
        token_url = self._token_url(client)
        refresh = RefreshGrant(
            self._http,
            token_url=token_url,
            client_id=client.client_id or "",
            client_secret=client.client_secret,
            scopes=client.scopes
            or ((GOOGLE_SCOPE,) if client.provider is OAuthProvider.GOOGLE else ()),
            route=route,
            clock=self._clock,
        )
        # Two generic providers may reuse a client id: the endpoint's host tells them apart.
        identity = TokenIdentity(
            provider=client.provider,
            tenant=host_of(token_url),
            client_id=client.client_id or "",
            user=user,
        )
        return refresh, identity
