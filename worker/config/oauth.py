"""The OAuth2 settings (README: "Logging in with OAuth2"): read with the other settings,
checked together, one line per problem naming the variable.

Which combinations make sense is decided here, before anything connects: `app` is
Microsoft's and needs one organisation's tenant (never `common`), `service_account` is
Google's, `delegated` needs a client id, and a generic provider needs its token URL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import urlsplit

from worker.config import values
from worker.tokens import AuthMethod, OAuthFlow, OAuthProvider

if TYPE_CHECKING:
    from worker.config.environment import Secret

_T = TypeVar("_T")

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
# Tenants that are not one organisation: the client credentials grant needs a real one.
MULTI_TENANT = frozenset({"common", "organizations", "consumers"})
_FLOW_PROVIDER = {
    OAuthFlow.APP: OAuthProvider.MICROSOFT,
    OAuthFlow.SERVICE_ACCOUNT: OAuthProvider.GOOGLE,
}


class Reader(Protocol):
    """The part of `worker.config.environment.EnvReader` this module uses."""

    def text(self, name: str) -> str | None: ...

    def parse(
        self, name: str, parser: Callable[[str], _T], default: _T, *, required: bool = False
    ) -> _T: ...

    def secret(self, name: str, *, required: bool) -> Secret | None: ...

    def fail(self, name: str, problem: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthSettings:
    """Route settings for OAuth2 logins; secrets are `Secret`s and print as ****."""

    provider: OAuthProvider
    flow: OAuthFlow
    tenant: str | None
    client_id: str | None
    client_secret: Secret | None
    client_cert_file: Path | None
    service_account_file: Path | None
    refresh_token: Secret | None
    authority: str
    token_url: str | None
    authorize_url: str | None  # `oauth login` for google (default Google's) and generic
    scopes: tuple[str, ...]  # empty: the provider's and flow's default


def https_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("not an https:// URL (tokens and secrets travel over it)")
    if parts.username or parts.password:
        raise ValueError("must not carry a user or password: give the client secret instead")
    return text.rstrip("/")


def read_oauth(
    env: Reader, *, imap_auth: AuthMethod, smtp_auth: AuthMethod, smtp_user: str | None
) -> tuple[OAuthSettings | None, Path | None]:
    """The OAuth2 settings when IMAP or SMTP logs in with oauth2 (else None), and
    INVOICE_RELAY_SECRET_KEY_FILE (a process setting, required with oauth2)."""
    uses_oauth = AuthMethod.OAUTH2 in (imap_auth, smtp_auth)
    secret_key_file = env.parse("SECRET_KEY_FILE", values.readable_file, None)
    provider = env.parse("OAUTH_PROVIDER", values.enum_of(OAuthProvider), None)
    flow = env.parse("OAUTH_FLOW", values.enum_of(OAuthFlow), None)
    tenant = env.text("OAUTH_TENANT")
    client_id = env.text("OAUTH_CLIENT_ID")
    client_secret = env.secret("OAUTH_CLIENT_SECRET", required=False)
    client_cert_file = env.parse("OAUTH_CLIENT_CERT_FILE", values.readable_file, None)
    service_account_file = env.parse("OAUTH_SERVICE_ACCOUNT_FILE", values.readable_file, None)
    refresh_token = env.secret("OAUTH_REFRESH_TOKEN", required=False)
    authority = env.parse("OAUTH_AUTHORITY", https_url, MICROSOFT_AUTHORITY)
    token_url = env.parse("OAUTH_TOKEN_URL", https_url, None)
    authorize_url = env.parse("OAUTH_AUTHORIZE_URL", https_url, None)
    scopes = tuple((env.text("OAUTH_SCOPE") or "").split())
    if not uses_oauth:
        return None, secret_key_file

    because = "required when INVOICE_RELAY_IMAP_AUTH or _SMTP_AUTH is oauth2"
    if secret_key_file is None:
        env.fail("SECRET_KEY_FILE", f"{because} (stored tokens are encrypted with it)")
    if smtp_auth is AuthMethod.OAUTH2 and smtp_user is None:
        env.fail("SMTP_USER", "required when INVOICE_RELAY_SMTP_AUTH is oauth2")
    # A value that did not parse has its own line already.
    if env.text("OAUTH_PROVIDER") is None:
        env.fail("OAUTH_PROVIDER", f"{because}: microsoft, google or generic")
    if env.text("OAUTH_FLOW") is None:
        env.fail("OAUTH_FLOW", f"{because}: app, service_account or delegated")
    if provider is None or flow is None:
        return None, secret_key_file

    expected = _FLOW_PROVIDER.get(flow)
    if expected is not None and provider is not expected:
        env.fail(
            "OAUTH_FLOW",
            f"{flow.value} is for OAUTH_PROVIDER={expected.value}, not {provider.value}",
        )
    if provider is OAuthProvider.MICROSOFT:
        if tenant is None:
            env.fail("OAUTH_TENANT", "required for microsoft: the tenant id or domain")
        elif flow is OAuthFlow.APP and tenant.lower() in MULTI_TENANT:
            env.fail(
                "OAUTH_TENANT",
                f"{tenant} is not one organisation: the app flow needs the tenant id or domain",
            )
    if flow in (OAuthFlow.APP, OAuthFlow.DELEGATED) and client_id is None:
        env.fail("OAUTH_CLIENT_ID", f"required for the {flow.value} flow")
    if flow is OAuthFlow.APP and (client_secret is None) == (client_cert_file is None):
        env.fail(
            "OAUTH_CLIENT_SECRET",
            "the app flow needs either a client secret or OAUTH_CLIENT_CERT_FILE, not both",
        )
    if flow is not OAuthFlow.APP and client_cert_file is not None:
        env.fail("OAUTH_CLIENT_CERT_FILE", "only the Microsoft app flow uses a certificate")
    if flow is OAuthFlow.SERVICE_ACCOUNT and service_account_file is None:
        env.fail("OAUTH_SERVICE_ACCOUNT_FILE", "required for the service_account flow")
    if provider is OAuthProvider.GENERIC and token_url is None:
        env.fail("OAUTH_TOKEN_URL", "required for a generic provider")
    return (
        OAuthSettings(
            provider=provider,
            flow=flow,
            tenant=tenant,
            client_id=client_id,
            client_secret=client_secret,
            client_cert_file=client_cert_file,
            service_account_file=service_account_file,
            refresh_token=refresh_token,
            authority=authority,
            token_url=token_url,
            authorize_url=authorize_url,
            scopes=scopes,
        ),
        secret_key_file,
    )
