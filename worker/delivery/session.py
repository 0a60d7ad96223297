"""Opening an SMTP session for `SmtpOutbox`: connect, TLS, and the login step (password
by smtplib or AUTH PLAIN in UTF-8, OAuth2 by XOAUTH2 or OAUTHBEARER).

Apart from `worker.delivery.smtp` because logging in is its own protocol (RFC 4954,
RFC 4616, worker.mail.sasl) with its own failures, and sending never needs it.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from worker.delivery.answers import answer, failure_reason
from worker.errors import SessionRefused, TokenEndpointError
from worker.mail.sasl import Exchange, SaslError, login_with_token, preferred_mechanism
from worker.models import Credentials, PasswordCredentials, Security
from worker.tokens import AccessToken, TokenCredentials, renew_session_at

__all__ = ["SMTPLIB_CHOICE", "discard", "login_mechanism", "open_session"]

logger = logging.getLogger(__name__)

SMTPLIB_CHOICE = "smtplib"  # CRAM-MD5, PLAIN or LOGIN, as smtplib prefers


def open_session(
    *,
    host: str,
    port: int,
    security: Security,
    credentials: Credentials | None,
    ca_file: Path | None,
    timeout: float,
) -> tuple[smtplib.SMTP, datetime | None]:
    """Connect, TLS, log in. Returns the session and, for an OAuth2 login, when it should
    be opened again with a fresh token (`worker.tokens.renew_session_at`). Raises
    `SessionRefused` (and `TokenEndpointError`, from a token source)."""

    def refused(reason: str) -> SessionRefused:
        return SessionRefused(reason, host=host, port=port)

    def tls_context() -> ssl.SSLContext:
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        return context

    smtp: smtplib.SMTP | None = None
    renew_at: datetime | None = None
    try:
        if ca_file is not None and not ca_file.is_file():
            raise refused(f"CA file {ca_file} is not readable (check INVOICE_RELAY_CA_FILE)")
        if security is Security.SSL:
            smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=tls_context())
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        smtp.ehlo()
        if security is Security.STARTTLS:
            if not smtp.has_extn("starttls"):
                raise refused(
                    "the server does not offer STARTTLS (check INVOICE_RELAY_SMTP_SECURITY)"
                )
            smtp.starttls(context=tls_context())
            smtp.ehlo()
        if credentials is not None:
            now = datetime.now(UTC)
            expires_at = _log_in(smtp, credentials, refused)
            if expires_at is not None:
                renew_at = renew_session_at(expires_at, logged_in_at=now)
    except (SessionRefused, TokenEndpointError):
        discard(smtp)
        raise
    except (smtplib.SMTPException, OSError) as exc:
        discard(smtp)
        reason = failure_reason(exc, timeout=timeout)
        password = _password(credentials)
        if password and isinstance(exc, smtplib.SMTPAuthenticationError):
            # A server may quote what it was sent; the password never goes further.
            reason = reason.replace(password, "****")
        raise refused(reason) from exc
    if smtp.sock is not None:
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return smtp, renew_at


def _log_in(
    smtp: smtplib.SMTP,
    credentials: Credentials,
    refused: Callable[[str], SessionRefused],
) -> datetime | None:
    """AUTH with smtplib's choice of mechanism, or, for a user or password that is
    not ASCII (which smtplib cannot encode), AUTH PLAIN in UTF-8 (RFC 4954, RFC 4616).
    Returns the expiry of the OAuth2 token it logged in with (None: a password).
    Raises `SessionRefused` when the server offers no mechanism that carries it."""
    match credentials:
        case TokenCredentials():
            return _log_in_with_token(smtp, credentials, refused)
        case PasswordCredentials(user=user, password=secret):
            password = secret.reveal()
    if not user:
        return None
    if not smtp.has_extn("auth"):
        # What smtplib's login() says, before it could try to encode anything.
        raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mechanism = login_mechanism(user, password, offered)
    if mechanism == SMTPLIB_CHOICE:
        smtp.login(user, password)
        return None
    if mechanism is None:
        # Named by position in the settings, never by a character of the secret.
        raise refused(
            "the user or password has non-ASCII characters and the server offers no "
            "login that can carry them (they need AUTH PLAIN; it offers "
            f"{' '.join(offered) or 'none'}); check INVOICE_RELAY_SMTP_USER/_PASSWORD"
        )
    response = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    code, reply = smtp.docmd("AUTH", "PLAIN " + response.decode("ascii"))
    if code == 503:  # already authenticated, as smtplib's login() accepts too
        return None
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)
    return None


def _log_in_with_token(
    smtp: smtplib.SMTP,
    credentials: TokenCredentials,
    refused: Callable[[str], SessionRefused],
) -> datetime:
    """AUTH XOAUTH2 (OAUTHBEARER where that is all it offers) with an initial response;
    the server's error challenge is answered with an empty line (worker.mail.sasl's
    Exchange), never in a loop. A refused token gets one retry with a fresh one, in
    the same session (a 535 leaves it usable)."""
    if not smtp.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mechanism = preferred_mechanism(frozenset(offered))
    if mechanism is None:
        raise refused(
            "the server offers no OAuth2 login (AUTH XOAUTH2 or OAUTHBEARER; it offers "
            f"{' '.join(offered) or 'none'}); check INVOICE_RELAY_SMTP_AUTH"
        )
    answers: list[str] = []
    accepted: list[datetime] = []  # the expiry of the token the server took

    def attempt(token: AccessToken) -> SaslError | None:
        exchange = Exchange(mechanism=mechanism, user=credentials.user, token=token.value)
        try:
            smtp.auth(mechanism, exchange.text, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            answers.append(answer(exc.smtp_code, exc.smtp_error))
            return exchange.error or SaslError(status=str(exc.smtp_code))
        accepted.append(token.expires_at)
        return None

    error = login_with_token(credentials.tokens, attempt)
    if error is not None:
        raise refused(
            f"OAuth2 login as {credentials.user} refused ({mechanism}, {error.status}): "
            f"{answers[-1]}; the mailbox may not send with this app (SMTP.SendAsApp, "
            "SMTP AUTH enabled on the mailbox: docs/oauth.md)"
        )
    return accepted[-1]


def login_mechanism(user: str, password: str, offered: Sequence[str]) -> str | None:
    """How to log in: smtplib's choice for ASCII; for anything else AUTH PLAIN in UTF-8
    (RFC 4954, RFC 4616) when the server offers it, since smtplib encodes every
    mechanism in ASCII; None when nothing offered can carry these."""
    if user.isascii() and password.isascii():
        return SMTPLIB_CHOICE
    if "PLAIN" in (mechanism.upper() for mechanism in offered):
        return "PLAIN"
    return None


def _password(credentials: Credentials | None) -> str:
    match credentials:
        case PasswordCredentials(password=secret):
            return secret.reveal()
        case TokenCredentials() | None:
            return ""


def discard(smtp: smtplib.SMTP | None) -> None:
    """Close the socket without a word to the server; never raises."""
    if smtp is None:
        return
    try:
        smtp.close()
    except OSError:
        logger.debug("closing the smtp socket failed", exc_info=True)
