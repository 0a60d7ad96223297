"""Microsoft Entra ID tokens through MSAL for Python: `app` (client credentials, with a secret
or a certificate) and `delegated` (the refresh grant, which rotates the refresh token).

MSAL does what would otherwise be hand-written and wrong in small ways: the authority's
instance discovery and OpenID metadata (where the token endpoint is), the certificate's
client assertion (a PS256 JWT with the certificate's SHA-256 thumbprint and x5c chain),
and the request's telemetry headers. Each grant builds a fresh application whose token
cache is thrown away: the one cache is the database's (worker.auth.cache), shared by every
process; only the metadata is kept between grants (MSAL's `http_cache`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msal

from worker.auth.grants import Deadline, Grant, error_for, parse_success
from worker.auth.http import MsalHttp, host_of
from worker.errors import ConfigError, TokenEndpointError

APP_SCOPE = "https://outlook.office365.com/.default"
# Delegated: the mailbox protocols' own scopes, and offline_access for a refresh token
# (MSAL adds offline_access, openid and profile itself).
DELEGATED_SCOPES = (
    "https://outlook.office365.com/IMAP.AccessAsUser.All",
    "https://outlook.office365.com/SMTP.Send",
)
# Tenants that are not one organisation: the client credentials grant needs a real one.
MULTI_TENANT = frozenset({"common", "organizations", "consumers"})
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
# Hosts MSAL knows: it validates them itself, without asking anyone.
_KNOWN_HOSTS = msal.authority.WELL_KNOWN_AUTHORITY_HOSTS


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class MicrosoftClient:
    """What identifies the app registration to Entra ID. Prints without its secret."""

    authority: str  # e.g. https://login.microsoftonline.com (no tenant)
    tenant: str
    client_id: str
    client_secret: str | None = None
    certificate_pem: str | None = None  # certificate and private key, PEM

    def __repr__(self) -> str:
        kind = "certificate" if self.certificate_pem else "secret"
        return f"MicrosoftClient(tenant={self.tenant!r}, client_id={self.client_id!r}, {kind})"

    @property
    def tenant_authority(self) -> str:
        return f"{self.authority.rstrip('/')}/{self.tenant}"

    def instance_discovery(self) -> bool | None:
        """What MSAL's `instance_discovery` gets: None (MSAL's default) for a host MSAL
        knows, such as login.microsoftonline.com, and False for any other.

        For a host it does not know, MSAL asks login.microsoftonline.com whether the host
        is an authority, and it asks there again for the host's aliases before it reads
        its token cache, even when `instance_discovery` names another endpoint (MSAL
        1.3x, `ClientApplication._get_instance_metadata`). A private or test authority
        must not depend on reaching Microsoft, so discovery is off for it: MSAL then
        trusts the configured authority and still reads that tenant's OpenID metadata
        (`{authority}/{tenant}/v2.0/.well-known/openid-configuration`) to find the token
        endpoint, as it does for Microsoft's own.
        """
        host = urlsplit(self.authority).hostname or ""
        return None if host in _KNOWN_HOSTS else False

    def credential(self) -> str | dict[str, str]:
        if self.certificate_pem is not None:
            return certificate_credential(self.certificate_pem)
        if self.client_secret is None:
            raise ConfigError("INVOICE_RELAY_OAUTH_CLIENT_SECRET", "required for the app flow")
        return self.client_secret


def certificate_credential(pem: str) -> dict[str, str]:
    """MSAL's certificate form: the private key and the public certificate (from which MSAL
    takes the SHA-256 thumbprint and the x5c chain), split out of one PEM file."""
    keys = [block[0] for block in _blocks(pem) if block[1].endswith("PRIVATE KEY")]
    certificates = [block[0] for block in _blocks(pem) if block[1] == "CERTIFICATE"]
    if len(keys) != 1 or not certificates:
        raise ConfigError(
            "INVOICE_RELAY_OAUTH_CLIENT_CERT_FILE",
            "needs one PEM private key and its certificate in the same file",
        )
    return {"private_key": keys[0], "public_certificate": "".join(certificates)}


def _blocks(pem: str) -> list[tuple[str, str]]:
    return [(match[0], match[1]) for match in _PEM_BLOCK.finditer(pem)]


class _MsalGrant:
    """Shared by both flows: one MSAL application per grant, the metadata cache kept."""

    def __init__(
        self,
        client: MicrosoftClient,
        http: httpx.Client,
        *,
        route: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._client = client
        self._http = http
        self._route = route
        self._clock = clock
        self._credential = client.credential() if self._confidential else None
        # MSAL's ThrottledHttpClient keeps discovery answers here; it is not thread-safe.
        self._metadata: MutableMapping[Any, Any] = {}
        self._metadata_lock = threading.Lock()

    _confidential = True

    def _application(
        self, deadline: Deadline, transport: MsalHttp | None = None
    ) -> msal.ClientApplication:
        kwargs: dict[str, Any] = {
            "authority": self._client.tenant_authority,
            "http_client": transport or MsalHttp(self._http, deadline),
            "http_cache": self._metadata,
            "instance_discovery": self._client.instance_discovery(),
            "app_name": "invoice-relay",
        }
        try:
            if self._confidential:
                return msal.ConfidentialClientApplication(
                    self._client.client_id, client_credential=self._credential, **kwargs
                )
            return msal.PublicClientApplication(self._client.client_id, **kwargs)
        except ValueError as exc:
            # MSAL raises ValueError for an authority it cannot validate or whose
            # metadata it cannot read (a 4xx from the discovery endpoints).
            raise TokenEndpointError(
                f"the authority {self._client.tenant_authority} was not accepted: {str(exc)[:160]}",
                endpoint=host_of(self._client.authority),
            ) from exc

    @contextmanager
    def _translated(self) -> Iterator[None]:
        # MSAL raises its own error for an HTTP error without a JSON body (a 500, a proxy's
        # page); a JSON error comes back as a dict and is read by _result.
        try:
            yield
        except msal.exceptions.MsalServiceError as exc:
            raise TokenEndpointError(
                str(exc)[:80], endpoint=host_of(self._client.authority)
            ) from exc

    def _result(self, answer: dict[str, Any], now: datetime) -> Grant:
        endpoint = host_of(self._client.authority)
        if "error" in answer:
            raise error_for(
                answer,
                status=400,
                endpoint=endpoint,
                client_id=self._client.client_id,
                route=self._route,
            )
        return parse_success(answer, now=now, endpoint=endpoint)


class MicrosoftApp(_MsalGrant):
    """Client credentials: the app's own permission on the mailbox (IMAP.AccessAsApp)."""

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant:
        del refresh_token  # the app flow has none
        with self._metadata_lock:
            application = self._application(deadline)
            assert isinstance(application, msal.ConfidentialClientApplication)
            now = self._clock()
            with self._translated():
                answer = application.acquire_token_for_client(scopes=[APP_SCOPE])
        return self._result(answer, now)


class MicrosoftDelegated(_MsalGrant):
    """The refresh grant for a user's mailbox. Microsoft rotates the refresh token on every
    use; the caller (worker.auth.cache) stores the new one before anything else."""

    def __init__(
        self,
        client: MicrosoftClient,
        http: httpx.Client,
        *,
        route: str,
        clock: Callable[[], datetime],
        scopes: tuple[str, ...] = DELEGATED_SCOPES,
    ) -> None:
        # A registration without a secret is a public client (a desktop app registration).
        self._confidential = client.client_secret is not None or client.certificate_pem is not None
        super().__init__(client, http, route=route, clock=clock)
        self._scopes = scopes

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant:
        if not refresh_token:
            raise error_for(
                {"error": "invalid_grant", "error_description": "no refresh token is stored"},
                status=400,
                endpoint=host_of(self._client.authority),
                route=self._route,
            )
        with self._metadata_lock:
            application = self._application(deadline)
            now = self._clock()
            with self._translated():
                answer = application.acquire_token_by_refresh_token(
                    refresh_token, scopes=list(self._scopes)
                )
        return self._result(answer, now)


def read_certificate(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            "INVOICE_RELAY_OAUTH_CLIENT_CERT_FILE", f"cannot read {path}: not a PEM file"
        ) from exc
