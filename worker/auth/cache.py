"""The token source the mail adapters use: one identity's tokens, cached in the database.

An access token is reused until shortly before it expires. A refresh locks the identity's
row, re-reads it and refreshes only if that is still needed, so IMAP, SMTP, routes and
replicas sharing an identity make one refresh between them, and a rotating refresh token
is never spent twice (Microsoft and our test server revoke the whole grant when a spent
one comes back). A rotated refresh token is saved in the same transaction, before the
new access token is handed to anyone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from worker.auth.crypto import Sealer
from worker.auth.grants import Grant, Grantor
from worker.auth.http import TimeBudget
from worker.tokens import AccessToken, StoredToken, TokenIdentity, TokenRows

log = logging.getLogger(__name__)

# An access token this close to its end is refreshed: a login that starts now must not
# see it expire mid-handshake, and clocks differ by some seconds.
REFRESH_MARGIN = timedelta(minutes=5)


class StoredTokenSource:
    """`worker.tokens.TokenSource` for one identity, over the store's token rows."""

    def __init__(
        self,
        *,
        identity: TokenIdentity,
        grantor: Grantor,
        rows: TokenRows,
        sealer: Sealer,
        timeout_seconds: float,
        configured_refresh_token: str | None = None,
        margin: timedelta = REFRESH_MARGIN,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._identity = identity
        self._key = identity.key()
        self._grantor = grantor
        self._rows = rows
        self._sealer = sealer
        self._timeout = timeout_seconds
        self._configured = configured_refresh_token
        self._margin = margin
        self._clock = clock

    def __repr__(self) -> str:
        return f"StoredTokenSource({self._identity!r})"

    @property
    def identity(self) -> TokenIdentity:
        return self._identity

    def access_token(self, *, refused: AccessToken | None = None) -> AccessToken:
        cached = self._usable(self._rows.read_token(self._key), refused)
        if cached is not None:
            return cached
        with self._rows.lock_token(self._key) as locked:
            # Another process may have refreshed while we waited for the lock.
            cached = self._usable(locked.current, refused)
            if cached is not None:
                log.info(
                    "oauth token refreshed by another process meanwhile: shared",
                    extra={"action": "oauth_token_shared", "user": self._identity.user},
                )
                return cached
            row = locked.current or StoredToken(key=self._key)
            refresh_token, origin = self._refresh_token(row)
            grant = self._grantor.grant(
                refresh_token=refresh_token, deadline=TimeBudget(seconds=self._timeout)
            )
            locked.save(self._row(row, grant, refresh_token, origin))
        log.info(
            "oauth token refreshed",
            extra={
                "action": "oauth_token_refreshed",
                "provider": self._identity.provider.value,
                "user": self._identity.user,
                "rotated": grant.refresh_token is not None,
            },
        )
        return grant.access

    def save_login(self, grant: Grant) -> None:
        """Store what `oauth login` obtained. The configured refresh token (if any) counts
        as this one's origin: it must not replace the token a person just signed in for."""
        if grant.refresh_token is None:
            raise ValueError("a sign-in that gave no refresh token cannot be stored")
        origin = self._sealer.digest(self._configured) if self._configured is not None else None
        with self._rows.lock_token(self._key) as locked:
            row = locked.current or StoredToken(key=self._key)
            locked.save(self._row(row, grant, None, origin))
        log.info(
            "oauth login stored",
            extra={"action": "oauth_login_stored", "user": self._identity.user},
        )

    def _usable(self, row: StoredToken | None, refused: AccessToken | None) -> AccessToken | None:
        if row is None or row.sealed_access is None or row.access_expires_at is None:
            return None
        token = AccessToken(
            value=self._sealer.open(row.sealed_access, bound_to=self._key),
            expires_at=row.access_expires_at,
        )
        if refused is not None and token.value == refused.value:
            return None
        return token if token.usable(self._clock(), self._margin_for(row)) else None

    def _margin_for(self, row: StoredToken) -> timedelta:
        # A token shorter-lived than twice the margin (Keycloak's default is 5 minutes)
        # is kept for half its life: else every login would refresh it.
        if row.refreshed_at is None or row.access_expires_at is None:
            return self._margin
        return min(self._margin, (row.access_expires_at - row.refreshed_at) / 2)

    def _refresh_token(self, row: StoredToken) -> tuple[str | None, str | None]:
        """The refresh token to spend, and the digest of the configured one it descends
        from. A configured token the stored one does not descend from replaces it: the
        person set a new one after a revocation."""
        configured_origin = (
            self._sealer.digest(self._configured) if self._configured is not None else None
        )
        if row.sealed_refresh is not None and row.origin == configured_origin:
            return self._sealer.open(row.sealed_refresh, bound_to=self._key), row.origin
        if row.sealed_refresh is not None and self._configured is None:
            return self._sealer.open(row.sealed_refresh, bound_to=self._key), row.origin
        return self._configured, configured_origin

    def _row(
        self, row: StoredToken, grant: Grant, spent: str | None, origin: str | None
    ) -> StoredToken:
        refresh = grant.refresh_token or spent
        return StoredToken(
            key=self._key,
            sealed_access=self._sealer.seal(grant.access.value, bound_to=self._key),
            access_expires_at=grant.access.expires_at,
            sealed_refresh=(
                self._sealer.seal(refresh, bound_to=self._key)
                if refresh is not None
                else row.sealed_refresh
            ),
            origin=origin,
            refreshed_at=self._clock(),
        )
