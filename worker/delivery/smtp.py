"""Sending forwarded mail; the only module that speaks SMTP.

`SmtpOutbox` is the adapter behind `worker.relay.ports.Destination` (and the notices'
`worker.relay.notify.NoticeSender`): it turns every smtplib, socket and TLS failure into
`SessionRefused` (the session is unusable, nothing counts) or a `DeliveryRefused` for this
one mail: 5xx `DeliveryRejected`, 4xx `DeliveryDeferred`, a connection lost while the
content went out `DeliveryUncertain`. The mail itself is built by `worker.delivery.message`.
(`worker.relay.pacer.SendPacer` enforces `INVOICE_RELAY_MAX_SENDS_PER_MINUTE`.)
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from email import policy
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.delivery.framing import Abandoned, data, forward_pieces, stuffed_slices
from worker.delivery.message import RELAY_HEADER, ForwardMail, build_forward, notice_message
from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryRejected,
    DeliveryUncertain,
    SessionRefused,
    TokenEndpointError,
)
from worker.mail.sasl import Exchange, SaslError, login_with_token, preferred_mechanism
from worker.mail.text import clean_text
from worker.models import (
    DEFAULT_TIMEOUT_SECONDS,
    Credentials,
    Notice,
    Parcel,
    PasswordCredentials,
    Receipt,
    Security,
)
from worker.tokens import AccessToken, TokenCredentials

__all__ = ["LOST_DURING_SEND", "SmtpOutbox"]

logger = logging.getLogger(__name__)

LOST_DURING_SEND = 451  # the code a send gets when the connection died mid-DATA


# --- the SMTP adapter -------------------------------------------------------------------


def _answer_text(answer: bytes | str) -> str:
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
    return clean_text(text, 500)


def _answer(code: int, answer: bytes | str) -> str:
    return f"{code} {_answer_text(answer)}".strip()


def _open_failure_reason(exc: Exception, *, timeout: float) -> str:
    """Why connecting, TLS or login failed, in words a person can act on."""
    match exc:
        case ssl.SSLCertVerificationError():
            why = exc.verify_message or exc.reason or "verification failed"
            return f"TLS certificate not trusted (set INVOICE_RELAY_CA_FILE): {why}"
        case ssl.SSLError():
            return f"TLS handshake failed: {exc.reason or exc}"
        case smtplib.SMTPAuthenticationError():
            return (
                "login refused (check INVOICE_RELAY_SMTP_USER/_PASSWORD): "
                f"{_answer(exc.smtp_code, exc.smtp_error)}"
            )
        case smtplib.SMTPNotSupportedError():
            return (
                "the server offers no login (check INVOICE_RELAY_SMTP_USER and "
                f"INVOICE_RELAY_SMTP_SECURITY): {exc}"
            )
        case smtplib.SMTPResponseException():
            return f"the server refused: {_answer(exc.smtp_code, exc.smtp_error)}"
        case smtplib.SMTPServerDisconnected():
            return f"the server closed the connection: {exc}"
        case smtplib.SMTPException():
            return f"SMTP error: {exc}"
        case ConnectionRefusedError():
            return "connection refused"
        case TimeoutError():
            return f"no answer within {timeout:g}s"
        case socket.gaierror():
            return f"host name not found: {exc.strerror or exc}"
        case OSError():
            return f"connection failed: {exc.strerror or exc}"
        case _:
            return f"{type(exc).__name__}: {exc}"


class SmtpOutbox:
    """One SMTP session to the outgoing server: `worker.relay.ports.Destination` for
    forwarded PDFs, `worker.relay.notify.NoticeSender` for notices."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Security,
        credentials: Credentials | None,
        forward_from: str,
        forward_to: str,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._host = host
        self._port = port
        self._security = security
        self._credentials = credentials
        self._forward_from = forward_from
        self._forward_to = forward_to
        self._ca_file = ca_file
        self._timeout = timeout
        self._smtp: smtplib.SMTP | None = None

    def __repr__(self) -> str:
        return (
            f"SmtpOutbox(host={self._host!r}, port={self._port}, "
            f"security={self._security.value!r}, credentials={self._credentials!r})"
        )

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    def _refused(self, reason: str) -> SessionRefused:
        return SessionRefused(reason, host=self._host, port=self._port)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._ca_file is not None:
            context.load_verify_locations(cafile=str(self._ca_file))
        return context

    def open(self) -> None:
        """Connect, TLS, log in. Raises `SessionRefused`."""
        self.close()
        smtp: smtplib.SMTP | None = None
        try:
            if self._ca_file is not None and not self._ca_file.is_file():
                raise self._refused(
                    f"CA file {self._ca_file} is not readable (check INVOICE_RELAY_CA_FILE)"
                )
            if self._security is Security.SSL:
                smtp = smtplib.SMTP_SSL(
                    self._host, self._port, timeout=self._timeout, context=self._tls_context()
                )
            else:
                smtp = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
            smtp.ehlo()
            if self._security is Security.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise self._refused(
                        "the server does not offer STARTTLS (check INVOICE_RELAY_SMTP_SECURITY)"
                    )
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if self._credentials is not None:
                self._log_in(smtp, self._credentials)
        except (SessionRefused, TokenEndpointError):
            _discard(smtp)
            raise
        except (smtplib.SMTPException, OSError) as exc:
            _discard(smtp)
            reason = _open_failure_reason(exc, timeout=self._timeout)
            password = _password(self._credentials)
            if password and isinstance(exc, smtplib.SMTPAuthenticationError):
                # A server may quote what it was sent; the password never goes further.
                reason = reason.replace(password, "****")
            raise self._refused(reason) from exc
        if smtp.sock is not None:
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._smtp = smtp
        logger.info(
            "smtp session open",
            extra={"action": "smtp_opened", "host": self._host, "port": self._port},
        )

    def _log_in(self, smtp: smtplib.SMTP, credentials: Credentials) -> None:
        """AUTH with smtplib's choice of mechanism, or, for a user or password that is
        not ASCII (which smtplib cannot encode), AUTH PLAIN in UTF-8 (RFC 4954, RFC 4616).
        Raises `SessionRefused` when the server offers no mechanism that carries it."""
        match credentials:
            case TokenCredentials():
                self._log_in_with_token(smtp, credentials)
                return
            case PasswordCredentials(user=user, password=secret):
                password = secret.reveal()
        if not user:
            return
        if not smtp.has_extn("auth"):
            # What smtplib's login() says, before it could try to encode anything.
            raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = login_mechanism(user, password, offered)
        if mechanism == SMTPLIB_CHOICE:
            smtp.login(user, password)
            return
        if mechanism is None:
            # Named by position in the settings, never by a character of the secret.
            raise self._refused(
                "the user or password has non-ASCII characters and the server offers no "
                "login that can carry them (they need AUTH PLAIN; it offers "
                f"{' '.join(offered) or 'none'}); check INVOICE_RELAY_SMTP_USER/_PASSWORD"
            )
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        code, answer = smtp.docmd("AUTH", "PLAIN " + response.decode("ascii"))
        if code == 503:  # already authenticated, as smtplib's login() accepts too
            return
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, answer)

    def _log_in_with_token(self, smtp: smtplib.SMTP, credentials: TokenCredentials) -> None:
        """AUTH XOAUTH2 (OAUTHBEARER where that is all it offers) with an initial response;
        the server's error challenge is answered with an empty line (worker.mail.sasl's
        Exchange), never in a loop. A refused token gets one retry with a fresh one, in
        the same session (a 535 leaves it usable)."""
        if not smtp.has_extn("auth"):
            raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = preferred_mechanism(frozenset(offered))
        if mechanism is None:
            raise self._refused(
                "the server offers no OAuth2 login (AUTH XOAUTH2 or OAUTHBEARER; it offers "
                f"{' '.join(offered) or 'none'}); check INVOICE_RELAY_SMTP_AUTH"
            )
        answers: list[str] = []

        def attempt(token: AccessToken) -> SaslError | None:
            exchange = Exchange(mechanism=mechanism, user=credentials.user, token=token.value)
            try:
                smtp.auth(mechanism, exchange.text, initial_response_ok=True)
            except smtplib.SMTPAuthenticationError as exc:
                answers.append(_answer(exc.smtp_code, exc.smtp_error))
                return exchange.error or SaslError(status=str(exc.smtp_code))
            return None

        error = login_with_token(credentials.tokens, attempt)
        if error is not None:
            raise self._refused(
                f"OAuth2 login as {credentials.user} refused ({mechanism}, {error.status}): "
                f"{answers[-1]}; the mailbox may not send with this app (SMTP.SendAsApp, "
                "SMTP AUTH enabled on the mailbox: docs/oauth.md)"
            )

    def deliver(self, parcel: Parcel, *, before_final: Callable[[], None] | None = None) -> Receipt:
        """Forward one PDF to FORWARD_TO (`worker.relay.ports.Destination.deliver`).

        The mail is built here (`worker.delivery.message.build_forward`); `before_final`
        runs before the terminating dot, the point after which the server may accept it.
        """
        mail = build_forward(parcel, forward_to=self._forward_to, forward_from=self._forward_from)
        answer = self.send(mail, before_end=before_final)
        return Receipt(delivery_id=mail.message_id, answer=answer)

    def send_notice(self, notice: Notice) -> str:
        """One failure notice (`worker.relay.notify.NoticeSender`)."""
        return self.send(notice_message(notice), recipient=notice.recipient)

    def send(
        self,
        message: ForwardMail | EmailMessage,
        *,
        recipient: str | None = None,
        before_end: Callable[[], None] | None = None,
    ) -> str:
        """Send one mail to FORWARD_TO (or `recipient`, for `check --send-test`).

        Returns the server's acceptance, e.g. "250 OK ...".

        Raises `SessionRefused` when the session cannot carry any mail (not open,
        sender or recipient refused, connection lost before the content went out) and a
        `DeliveryRefused` when the server answered this mail's content (4xx
        `DeliveryDeferred`, 5xx `DeliveryRejected`) or the connection died while it went
        out (`DeliveryUncertain`, code 451: it may or may not have arrived; the outbox is
        closed then).
        """
        smtp = self._smtp
        if smtp is None:
            raise self._refused("the session is not open")
        if isinstance(message, ForwardMail):
            sha256 = message.sha256
            pieces = forward_pieces(message)
        else:
            sha256 = str(message.get(RELAY_HEADER, ""))
            pieces = stuffed_slices(message.as_bytes(policy=policy.SMTP))

        # Envelope first: a refusal here concerns the session (sender, recipient,
        # connection), never this mail's content.
        try:
            code, answer = smtp.mail(self._forward_from)
            if not 200 <= code < 300:
                self._reset_or_drop()
                raise self._refused(
                    f"sender {self._forward_from} refused (check INVOICE_RELAY_FORWARD_FROM): "
                    f"{_answer(code, answer)}"
                )
            to = recipient or self._forward_to
            code, answer = smtp.rcpt(to)
            if not 200 <= code < 300:
                self._reset_or_drop()
                raise self._refused(
                    f"recipient {to} refused (check INVOICE_RELAY_FORWARD_TO): "
                    f"{_answer(code, answer)}"
                )
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            reason = _open_failure_reason(exc, timeout=self._timeout)
            raise self._refused(f"connection lost before sending: {reason}") from exc

        try:
            code, answer = data(smtp, pieces, before_end)
        except smtplib.SMTPDataError as exc:
            # The server refused the DATA command itself: an answer about this mail.
            self._reset_or_drop()
            raise _refusal(
                _answer(exc.smtp_code, exc.smtp_error), code=exc.smtp_code, sha256=sha256
            ) from exc
        except Abandoned as abandoned:
            # `before_end` raised: the mail is abandoned without its terminating dot, so
            # the server drops what it received with the connection.
            self._drop()
            raise abandoned.cause from None
        except (smtplib.SMTPException, OSError) as exc:
            # Part or all of the mail went out and no answer came back: the server may
            # have accepted it. Temporary, so it is retried under the same Message-ID.
            self._drop()
            raise DeliveryUncertain(
                f"connection lost during send: {_open_failure_reason(exc, timeout=self._timeout)}",
                code=LOST_DURING_SEND,
                sha256=sha256,
            ) from exc

        if 200 <= code < 300:
            return _answer(code, answer)
        self._reset_or_drop()
        if 400 <= code < 600:
            raise _refusal(_answer(code, answer), code=code, sha256=sha256)
        # Neither 2xx, 4xx nor 5xx after the content is a broken server, which may have
        # kept the mail: retry later, like a connection lost during the send.
        raise DeliveryUncertain(_answer(code, answer), code=LOST_DURING_SEND, sha256=sha256)

    def close(self) -> None:
        """QUIT; never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            _discard(smtp)

    def _reset_or_drop(self) -> None:
        """RSET so the session can carry the next mail; drop it if even that fails."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()
            return
        if not 200 <= code < 300:
            self._drop()

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        _discard(smtp)


SMTPLIB_CHOICE = "smtplib"  # CRAM-MD5, PLAIN or LOGIN, as smtplib prefers


def login_mechanism(user: str, password: str, offered: Sequence[str]) -> str | None:
    """How to log in: smtplib's choice for ASCII; for anything else AUTH PLAIN in UTF-8
    (RFC 4954, RFC 4616) when the server offers it, since smtplib encodes every
    mechanism in ASCII; None when nothing offered can carry these."""
    if user.isascii() and password.isascii():
        return SMTPLIB_CHOICE
    if "PLAIN" in (mechanism.upper() for mechanism in offered):
        return "PLAIN"
    return None


def _refusal(detail: str, *, code: int, sha256: str) -> DeliveryRefused:
    """A reply to this mail's content: 5xx refuses it for good, anything else for now."""
    if 500 <= code < 600:
        return DeliveryRejected(detail, code=code, sha256=sha256)
    return DeliveryDeferred(detail, code=code, sha256=sha256)


def _password(credentials: Credentials | None) -> str:
    match credentials:
        case PasswordCredentials(password=secret):
            return secret.reveal()
        case TokenCredentials() | None:
            return ""


def _discard(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.close()
    except OSError:
        logger.debug("closing the smtp socket failed", exc_info=True)
