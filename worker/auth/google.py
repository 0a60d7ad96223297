"""Google tokens: the service account's JWT grant (domain-wide delegation) via google-auth,
and the plain refresh grant (RFC 6749 §6) for `delegated` with Google or a generic provider.

google-auth signs the grant's JWT assertion (RS256 with the key from the JSON file, the
claims Google checks: iss, sub, scope, aud, iat, exp); signing it by hand is the kind of
code that is subtly wrong. The refresh grant is a single form POST whose answer
worker.auth.grants reads, so it needs no library beyond the HTTP client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google.auth.exceptions
import httpx
from google.oauth2 import service_account

from worker.auth.grants import Deadline, Grant, error_for, parse_success
from worker.auth.http import GoogleRequest, host_of, translated
from worker.errors import ConfigError, TokenEndpointError
from worker.tokens import AccessToken

GOOGLE_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
_SERVICE_ACCOUNT_KEYS = ("type", "client_email", "private_key", "token_uri")


def read_service_account(path: Path) -> dict[str, Any]:
    """The JSON key file, checked enough that a wrong file fails at start-up."""
    variable = "INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as exc:
        raise ConfigError(variable, f"{path} is not a readable JSON key file") from exc
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError(variable, f"{path} is not a service account key (type)")
    missing = [key for key in _SERVICE_ACCOUNT_KEYS if not info.get(key)]
    if missing:
        raise ConfigError(variable, f"{path} lacks {', '.join(missing)}")
    return info


class GoogleServiceAccount:
    """Domain-wide delegation: the service account acts as the mailbox (`sub`)."""

    def __init__(
        self,
        info: Mapping[str, Any],
        http: httpx.Client,
        *,
        subject: str,
        token_url: str | None,
        scopes: tuple[str, ...] = (GOOGLE_SCOPE,),
        route: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._info = dict(info)
        self._subject = subject
        self._token_url = token_url
        self._scopes = scopes
        self._credentials()  # a key that does not load fails at start-up
        self._endpoint = host_of(token_url or str(info["token_uri"]))
        self._client_id = str(info.get("client_id") or info["client_email"])
        self._http = http
        self._route = route
        self._clock = clock

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant:
        del refresh_token  # the JWT grant needs none
        credentials = self._credentials()
        try:
            credentials.refresh(GoogleRequest(self._http, deadline))  # type: ignore[no-untyped-call]
        except google.auth.exceptions.RefreshError as exc:
            raise self._refused(exc) from exc
        except google.auth.exceptions.TransportError as exc:
            cause = exc.__cause__
            if isinstance(cause, TokenEndpointError):
                raise cause from exc
            raise TokenEndpointError("transport failed", endpoint=self._endpoint) from exc
        if not credentials.token or credentials.expiry is None:
            raise TokenEndpointError("the answer has no access_token", endpoint=self._endpoint)
        # google-auth keeps expiry as a naive UTC datetime.
        expires_at = credentials.expiry.replace(tzinfo=UTC)
        return Grant(access=AccessToken(value=credentials.token, expires_at=expires_at))

    def _credentials(self) -> service_account.Credentials:
        # New per grant: google-auth's Credentials keep the token as mutable state.
        try:
            loaded = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                self._info, scopes=list(self._scopes)
            )
            credentials: service_account.Credentials = loaded.with_subject(self._subject)
        except ValueError as exc:
            raise ConfigError(
                "INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE", "its private_key cannot be read"
            ) from exc
        if self._token_url is not None:
            credentials = credentials.with_token_uri(self._token_url)
        return credentials

    def _refused(self, exc: google.auth.exceptions.RefreshError) -> TokenEndpointError:
        # RefreshError(details, response_data): the endpoint's JSON is the second arg.
        body = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else None
        if body is None:
            return TokenEndpointError("the grant failed", endpoint=self._endpoint)
        return error_for(
            body, status=400, endpoint=self._endpoint, client_id=self._client_id, route=self._route
        )


class RefreshGrant:
    """RFC 6749 §6 against a token endpoint: Google's, or a generic provider's."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scopes: tuple[str, ...],
        route: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._http = http
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scopes = scopes
        self._route = route
        self._clock = clock

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant:
        endpoint = host_of(self._token_url)
        if not refresh_token:
            raise error_for(
                {"error": "invalid_grant", "error_description": "no refresh token is stored"},
                status=400,
                endpoint=endpoint,
                route=self._route,
            )
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        form["client_id"] = self._client_id
        if self._client_secret is not None:
            form["client_secret"] = self._client_secret
        if self._scopes:
            form["scope"] = " ".join(self._scopes)
        return token_request(
            self._http,
            self._token_url,
            form,
            deadline=deadline,
            client_id=self._client_id,
            route=self._route,
            now=self._clock(),
        )


def token_request(
    http: httpx.Client,
    token_url: str,
    form: Mapping[str, str],
    *,
    deadline: Deadline,
    client_id: str,
    route: str,
    now: datetime,
) -> Grant:
    """One RFC 6749 token request (a form POST, §4.1.3 or §6) and its answer, read by
    worker.auth.grants; within `deadline`."""
    endpoint = host_of(token_url)
    left = deadline.remaining()
    if left <= 0:
        raise TokenEndpointError("no answer in time", endpoint=endpoint)
    with translated(token_url):
        response = http.post(
            token_url,
            data=dict(form),
            headers={"Accept": "application/json"},
            timeout=httpx.Timeout(left),
        )
    body = _json_object(response)
    if response.status_code != 200 or body is None:
        raise error_for(
            body, status=response.status_code, endpoint=endpoint, client_id=client_id, route=route
        )
    return parse_success(body, now=now, endpoint=endpoint)


def _json_object(response: httpx.Response) -> dict[str, object] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
