"""Token endpoint answers (RFC 6749 §5.1 success, §5.2 error) as values and errors. Pure.

Every flow ends here, whichever library spoke to the endpoint: MSAL hands back the
endpoint's JSON as a dict, google-auth raises with it attached, the plain refresh grant
reads it itself. One table decides what each error means for the person running the relay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from worker.errors import OAuthClientRejected, OAuthLoginRefused, TokenEndpointError
from worker.tokens import MASK, AccessToken

# Text from a token endpoint is a stranger's: capped, and only its first line.
_DESCRIPTION_CAP = 200
# RFC 6749 makes expires_in optional; Microsoft and Google always send it. Without it,
# assume a short life rather than caching a token that may already be dead.
DEFAULT_LIFETIME = timedelta(minutes=5)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Grant:
    """What one successful token request gave: an access token, and a rotated refresh token."""

    access: AccessToken
    refresh_token: str | None = None  # None: keep the one we have

    def __repr__(self) -> str:
        rotated = MASK if self.refresh_token else None
        return f"Grant(access={self.access!r}, refresh_token={rotated})"


class Deadline(Protocol):
    """The time left for one token request, INVOICE_RELAY_TIMEOUT in all (worker.auth.http)."""

    def remaining(self) -> float: ...


class Grantor(Protocol):
    """One flow's token request. `refresh_token` only for the delegated flow."""

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant: ...


def parse_success(body: Mapping[str, object], *, now: datetime, endpoint: str) -> Grant:
    """RFC 6749 §5.1: `access_token`, `token_type` Bearer, `expires_in` seconds, an
    optional `refresh_token`. Anything else is the endpoint misbehaving: transient."""
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenEndpointError("the answer has no access_token", endpoint=endpoint)
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenEndpointError(
            f"token_type {_clean(str(token_type))!r} is not Bearer", endpoint=endpoint
        )
    lifetime = _lifetime(body.get("expires_in"))
    refresh = body.get("refresh_token")
    return Grant(
        access=AccessToken(value=access, expires_at=now + lifetime),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
    )


def error_for(
    body: Mapping[str, object] | None,
    *,
    status: int,
    endpoint: str,
    client_id: str = "",
    route: str = "the default route",
) -> TokenEndpointError:
    """RFC 6749 §5.2: `error` (a code from a fixed list) and `error_description`. Only
    invalid_grant and invalid_client are a person's to fix; other errors and answers
    without a code (a 500, an HTML page) are an outage of the endpoint."""
    code = body.get("error") if body is not None else None
    description = body.get("error_description") if body is not None else None
    detail = _clean(description) if isinstance(description, str) else f"HTTP {status}"
    if code == "invalid_grant":
        return OAuthLoginRefused(detail, endpoint=endpoint, route=route)
    if code == "invalid_client" or (code is None and status == 401):
        return OAuthClientRejected(detail, endpoint=endpoint, client_id=client_id)
    if isinstance(code, str) and code:
        return TokenEndpointError(f"{_clean(code)}: {detail}", endpoint=endpoint, error=code)
    return TokenEndpointError(detail, endpoint=endpoint)


def _lifetime(value: object) -> timedelta:
    # Some endpoints (older Azure AD v1) send expires_in as a string of digits.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    return DEFAULT_LIFETIME


def _clean(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    printable = "".join(char if char.isprintable() else "?" for char in first)
    return printable[:_DESCRIPTION_CAP]
