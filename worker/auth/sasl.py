"""The SASL messages that carry a bearer token: XOAUTH2 (Google's and Microsoft's) and
OAUTHBEARER (RFC 7628). Pure: bytes in, bytes out; the IMAP and SMTP adapters send them.

Both are a client's initial response; on failure the server sends one challenge, a
base64 JSON error (RFC 7628 §3.2.2), which the client must answer with an empty response
(XOAUTH2) or `\\x01` (OAUTHBEARER, §3.2.3) to get the final NO/535.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

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
