"""OAuth2 vocabulary shared by the settings, the token adapter (worker.auth), the store and
the mail adapters: who a token is for, the token itself, and the ports between them.

Pure: no I/O. The token libraries live in worker.auth alone; the SQL in worker.store.
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

MASK = "****"


class AuthMethod(enum.Enum):
    PASSWORD = "password"  # noqa: S105 - LOGIN / AUTH PLAIN with a password
    OAUTH2 = "oauth2"  # SASL XOAUTH2 (OAUTHBEARER where that is all the server offers)


class OAuthProvider(enum.Enum):
    MICROSOFT = "microsoft"  # Microsoft Entra ID (Microsoft 365), through MSAL
    GOOGLE = "google"  # Google Workspace, through google-auth
    GENERIC = "generic"  # any RFC 6749 token endpoint: only the refresh grant


class OAuthFlow(enum.Enum):
    APP = "app"  # Microsoft client credentials: the app's own permission on the mailbox
    SERVICE_ACCOUNT = "service_account"  # Google JWT grant, subject = the mailbox
    DELEGATED = "delegated"  # a user's refresh token, rotated on use


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenIdentity:
    """Whose token it is: IMAP, SMTP, routes and replicas with the same identity share it."""

    provider: OAuthProvider
    tenant: str
    client_id: str
    user: str

    def key(self) -> str:
        """The stored row's key. Tab-separated: no part of an identity contains a tab."""
        return "\t".join((self.provider.value, self.tenant, self.client_id, self.user.lower()))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class AccessToken:
    """A bearer token and when it stops working. Prints without its value."""

    value: str
    expires_at: datetime  # UTC

    def usable(self, now: datetime, margin: timedelta) -> bool:
        """Still good for at least `margin`: a login or an IDLE session started now ends in time."""
        return self.expires_at - margin > now

    def __repr__(self) -> str:
        return f"AccessToken({MASK}, expires_at={self.expires_at.isoformat()})"

    __str__ = __repr__


SESSION_LEAD = timedelta(minutes=1)


def renew_session_at(expires_at: datetime, *, logged_in_at: datetime) -> datetime:
    """When a session logged in with a token that expires at `expires_at` is logged in
    again, with a fresh token, between two commands: `SESSION_LEAD` before the token
    expires, or a quarter of its remaining life before when that is shorter. Exchange
    Online ends an IMAP session whose token expired (`BYE ... AccessTokenExpired`), so a
    backfill that outlasts a token renews its sessions instead of losing them. The lead
    is inside the token source's refresh margin (worker.auth.cache), so the new session
    gets a new token, not the same one again."""
    lead = min(SESSION_LEAD, max(expires_at - logged_in_at, timedelta(0)) / 4)
    return expires_at - lead


class TokenSource(Protocol):
    """What a mail adapter needs to log in with OAuth2."""

    def access_token(self, *, refused: AccessToken | None = None) -> AccessToken:
        """A token usable now. `refused`: the server just refused that one, so return any
        other (another process may have refreshed already) or refresh. Raises
        `worker.errors.TokenEndpointError` or one of its subclasses."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenCredentials:
    """An OAuth2 login for IMAP or SMTP: the mailbox (SASL `user=`) and where its tokens
    come from. The password twin is worker.models' Credentials; an adapter given this
    logs in with XOAUTH2 (worker.mail.sasl)."""

    user: str
    tokens: TokenSource

    def __repr__(self) -> str:
        return f"TokenCredentials(user={self.user!r})"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class StoredToken:
    """One identity's row as the store keeps it: secrets only sealed (worker.auth.crypto)."""

    key: str
    sealed_access: bytes | None = None
    access_expires_at: datetime | None = None
    sealed_refresh: bytes | None = None
    # A keyed digest of the configured refresh token this row's refresh token descends
    # from: a different configured one replaces the stored one (recovery after revocation).
    origin: str | None = None
    refreshed_at: datetime | None = None

    def __repr__(self) -> str:
        return f"StoredToken(key={self.key!r}, refreshed_at={self.refreshed_at})"


class TokenLock(Protocol):
    """An identity's row, locked for one refresh (FOR UPDATE / BEGIN IMMEDIATE)."""

    @property
    def current(self) -> StoredToken | None:
        """The row as re-read under the lock; None before the identity's first token."""
        ...

    def save(self, row: StoredToken) -> None:
        """Write the row in the locked transaction (committed when the lock is released)."""
        ...


class TokenRows(Protocol):
    """The store's side of token caching (worker.store.tokens)."""

    def read_token(self, key: str) -> StoredToken | None: ...

    def lock_token(self, key: str) -> AbstractContextManager[TokenLock]: ...
