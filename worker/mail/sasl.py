"""The SASL messages that carry a bearer token: XOAUTH2 (Google's and Microsoft's) and
OAUTHBEARER (RFC 7628), and the rule for a refused token. Pure: bytes in, bytes out; the
IMAP and SMTP adapters (which may not import worker.auth) send them.

Both are a client's initial response; on failure the server sends one challenge, a
base64 JSON error (RFC 7628 §3.2.2), which the client must answer with an empty response
(XOAUTH2) or `\\x01` (OAUTHBEARER, §3.2.3) to get the final NO/535.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass

from worker.tokens import AccessToken, TokenSource

_SEPARATOR = "\x01"
# What the client answers to the error challenge, so the server ends the exchange.
XOAUTH2_ABORT = b""
OAUTHBEARER_ABORT = b"\x01"


def xoauth2(*, user: str, token: str) -> bytes:
    """`user=<user>^Aauth=Bearer <token>^A^A` (Google's and Microsoft's XOAUTH2)."""
    _check(user=user, token=token)
    return f"user={user}{_SEPARATOR}auth=Bearer {token}{_SEPARATOR}{_SEPARATOR}".encode()


def oauthbearer(
    *, user: str, token: str, host: str | None = None, port: int | None = None
) -> bytes:
    """RFC 7628 §3.1: a GS2 header naming the user (`n,a=<saslname>,`), then key=value
    pairs separated by ^A: host and port when known, the bearer token, and ^A^A."""
    _check(user=user, token=token)
    if host is not None and not _printable(host):
        raise ValueError("the host has characters SASL cannot carry")
    # RFC 5801 saslname: "," and "=" are escaped as =2C and =3D.
    saslname = user.replace("=", "=3D").replace(",", "=2C")
    pairs = []
    if host is not None:
        pairs.append(f"host={host}")
    if port is not None:
        pairs.append(f"port={port}")
    pairs.append(f"auth=Bearer {token}")
    body = "".join(pair + _SEPARATOR for pair in pairs)
    return f"n,a={saslname},{_SEPARATOR}{body}{_SEPARATOR}".encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslError:
    """A server's error challenge (RFC 7628 §3.2.2): for the message and the decision
    whether a fresh token may help (`invalid_token` is RFC 6750's expired or revoked)."""

    status: str  # "invalid_token", "insufficient_scope", or an HTTP-like "401"
    scope: str | None = None

    @property
    def token_refused(self) -> bool:
        return self.status in ("invalid_token", "401")


def sasl_error(challenge: bytes) -> SaslError | None:
    """The JSON in an error challenge, already base64-decoded or not; None if it is none.
    IMAP servers send it base64-encoded, imapclient and smtplib hand over either."""
    for candidate in (challenge, _unbase64(challenge)):
        if candidate is None:
            continue
        try:
            parsed = json.loads(candidate)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("status"), str):
            scope = parsed.get("scope")
            return SaslError(
                status=parsed["status"][:40], scope=scope[:200] if isinstance(scope, str) else None
            )
    return None


def _unbase64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _check(*, user: str, token: str) -> None:
    if not user or not _printable(user):
        raise ValueError("the user name is empty or has characters SASL cannot carry")
    # RFC 6750 b64token: the only characters a bearer token has.
    if not token or not all(
        char.isascii() and (char.isalnum() or char in "-._~+/=") for char in token
    ):
        raise ValueError("the access token is empty or not an RFC 6750 bearer token")


def _printable(text: str) -> bool:
    return all(" " < char <= "~" or ord(char) > 0x7F for char in text) and _SEPARATOR not in text


class Exchange:
    """One XOAUTH2 or OAUTHBEARER exchange, as the callable the client libraries drive:
    imapclient's `sasl_login(mechanism, exchange)` and smtplib's `auth(mechanism,
    exchange.text, initial_response_ok=True)`. The first call answers with the initial
    response; a second call is the server's error challenge, kept in `error` and answered
    with the abort message so the server ends the exchange with its NO / 535. A third
    call means the server is looping: it gets the abort message again."""

    def __init__(self, *, mechanism: str, user: str, token: str) -> None:
        if mechanism == "XOAUTH2":
            self._initial, self._abort = xoauth2(user=user, token=token), XOAUTH2_ABORT
        elif mechanism == "OAUTHBEARER":
            self._initial, self._abort = oauthbearer(user=user, token=token), OAUTHBEARER_ABORT
        else:
            raise ValueError(f"{mechanism} does not carry a bearer token")
        self.mechanism = mechanism
        self.error: SaslError | None = None
        self._calls = 0

    def __repr__(self) -> str:
        return f"Exchange({self.mechanism}, error={self.error})"

    def __call__(self, challenge: bytes | None = None) -> bytes:
        self._calls += 1
        if self._calls == 1 and not challenge:
            return self._initial
        if self.error is None and challenge:
            self.error = sasl_error(challenge) or SaslError(status="unreadable")
        return self._abort

    def text(self, challenge: bytes | None = None) -> str:
        """smtplib's form: it base64-encodes the text it gets."""
        return self(challenge).decode("ascii")


def preferred_mechanism(offered: frozenset[str]) -> str | None:
    """XOAUTH2 where offered (Microsoft and Google document it), else OAUTHBEARER."""
    for mechanism in ("XOAUTH2", "OAUTHBEARER"):
        if mechanism in offered:
            return mechanism
    return None


def login_with_token(
    tokens: TokenSource, attempt: Callable[[AccessToken], SaslError | None]
) -> SaslError | None:
    """Log in with the source's token; when the server refuses it as invalid or expired,
    once more with a fresh one (another process may have refreshed, or the token was
    revoked early). `attempt` returns None on success or the server's error. Returns the
    last error, for the adapter to classify; never loops."""
    token = tokens.access_token()
    error = attempt(token)
    if error is None or not error.token_refused:
        return error
    return attempt(tokens.access_token(refused=token))
