"""Building and sending forwarded mail; the only module that speaks SMTP.

`build_forward` is pure: one `OutgoingDocument` to one `EmailMessage`. `SmtpOutbox` is
the adapter behind `worker.ports.Outbox`: it turns every smtplib, socket and TLS failure
into `SessionRefused` (the session is unusable, nothing counts) or `SendRejected` (this
one mail was refused; `code` says temporary or permanent).
(`worker.pacer.SendPacer` enforces `INVOICE_RELAY_MAX_SENDS_PER_MINUTE`.)
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import unicodedata
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.errors import SendRejected, SessionRefused
from worker.models import OutgoingDocument, Security

logger = logging.getLogger(__name__)

RELAY_HEADER = "X-Invoice-Relay"
DEFAULT_RELAY_ID = "invoice-relay"
SUBJECT_LIMIT = 200
FILENAME_LIMIT = 200
BODY_FIELD_LIMIT = 300
LOST_DURING_SEND = 451  # the code a send gets when the connection died mid-DATA

_WHITESPACE = re.compile(r"\s+")
_HEX = re.compile(r"[0-9a-f]+")
_RELAY_ID = re.compile(r"[A-Za-z0-9.-]+")
_PATH_SEPARATORS = str.maketrans({"/": " ", "\\": " "})


# --- pure: the forwarded mail -----------------------------------------------------------


def _drop_controls(value: str) -> str:
    # Cc covers CR, LF, NUL, TAB and DEL; Zl/Zp are the Unicode line and paragraph
    # separators, which some readers treat as line breaks too. They become spaces so
    # that words on either side stay apart.
    return "".join(
        " " if unicodedata.category(char) in {"Cc", "Zl", "Zp"} else char for char in value
    )


def clean_text(value: str, limit: int) -> str:
    """One line of text: control characters removed, whitespace collapsed, at most `limit`."""
    collapsed = _WHITESPACE.sub(" ", _drop_controls(value)).strip()
    return collapsed[:limit].rstrip()


def clean_filename(value: str, limit: int = FILENAME_LIMIT) -> str:
    """An attachment name with no control characters and no path; "invoice.pdf" when empty.

    A name cut at `limit` keeps its `.pdf` ending so the receiver still sees a PDF.
    """
    name = clean_text(value.translate(_PATH_SEPARATORS), limit=len(value) + 1)
    name = name.lstrip(". ")  # no hidden files, no "..": the name is a leaf, never a path
    if not name:
        return "invoice.pdf"
    if len(name) <= limit:
        return name
    suffix = ".pdf" if name.lower().endswith(".pdf") else ""
    return name[: limit - len(suffix)].rstrip() + suffix


def forward_message_id(sha256: str, resend_count: int, *, relay_id: str = DEFAULT_RELAY_ID) -> str:
    """The forwarded mail's Message-ID: the same for every retry of one send.

    A deliberate resend (`resend_count` > 0) gets a new one, so the receiver does not
    discard it as a copy of the first.
    """
    digest = sha256.lower()
    if not _HEX.fullmatch(digest):
        raise ValueError(f"sha256 must be hexadecimal, got {sha256!r}")
    if resend_count < 0:
        raise ValueError(f"resend_count must not be negative, got {resend_count}")
    if not _RELAY_ID.fullmatch(relay_id):
        raise ValueError(f"relay_id must be a plain domain-like word, got {relay_id!r}")
    return f"<{digest[:32]}.{resend_count}@{relay_id}>"


def _describe_date(value: datetime | None) -> str:
    if value is None:
        return "unknown"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return format_datetime(aware)


def _body(document: OutgoingDocument, filename: str) -> str:
    def field(value: str) -> str:
        return clean_text(value, BODY_FIELD_LIMIT) or "unknown"

    return (
        "invoice-relay forwarded this invoice.\n"
        "\n"
        f"Original sender: {field(document.original_sender)}\n"
        f"Original date: {_describe_date(document.original_date)}\n"
        f"Original Message-ID: {field(document.original_message_id)}\n"
        f"File: {filename}\n"
        f"SHA-256: {document.sha256.lower()}\n"
    )


def build_forward(
    document: OutgoingDocument,
    *,
    forward_to: str,
    forward_from: str,
    relay_id: str = DEFAULT_RELAY_ID,
    now: datetime | None = None,
) -> EmailMessage:
    """The mail that forwards one document (DESIGN.md, "Forwarded mail").

    `now` is the Date header (the current time when None). Raises ValueError for a
    `sha256` that is not hexadecimal or an address that cannot be a header.
    """
    message_id = forward_message_id(document.sha256, document.resend_count, relay_id=relay_id)
    filename = clean_filename(document.filename)
    subject = clean_text(document.original_subject, SUBJECT_LIMIT) or f"Invoice {filename}"
    sent_at = now if now is not None else datetime.now(UTC)

    message = EmailMessage(policy=policy.SMTP)
    message["From"] = forward_from
    message["To"] = forward_to
    message["Subject"] = subject
    message["Date"] = format_datetime(
        sent_at if sent_at.tzinfo is not None else sent_at.replace(tzinfo=UTC)
    )
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message[RELAY_HEADER] = document.sha256.lower()
    # Quoted-printable keeps the whole mail 7-bit: no 8BITMIME needed from the server.
    message.set_content(_body(document, filename), cte="quoted-printable")
    message.add_attachment(
        document.content, maintype="application", subtype="pdf", filename=filename
    )
    return message


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
    """One SMTP session to the outgoing server (`worker.ports.Outbox`)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Security,
        user: str | None,
        password: str | None,
        forward_from: str,
        forward_to: str,
        ca_file: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._host = host
        self._port = port
        self._security = security
        self._user = user
        self._password = password
        self._forward_from = forward_from
        self._forward_to = forward_to
        self._ca_file = ca_file
        self._timeout = timeout
        self._smtp: smtplib.SMTP | None = None

    def __repr__(self) -> str:
        return (
            f"SmtpOutbox(host={self._host!r}, port={self._port}, "
            f"security={self._security.value!r}, user={self._user!r})"
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
            if self._user:
                smtp.login(self._user, self._password or "")
        except SessionRefused:
            _discard(smtp)
            raise
        except (smtplib.SMTPException, OSError) as exc:
            _discard(smtp)
            reason = _open_failure_reason(exc, timeout=self._timeout)
            if self._password and isinstance(exc, smtplib.SMTPAuthenticationError):
                # A server may quote what it was sent; the password never goes further.
                reason = reason.replace(self._password, "****")
            raise self._refused(reason) from exc
        self._smtp = smtp
        logger.info(
            "smtp session open",
            extra={"action": "smtp_opened", "host": self._host, "port": self._port},
        )

    def send(self, message: EmailMessage, *, recipient: str | None = None) -> str:
        """Send one mail to FORWARD_TO (or `recipient`, for `check --send-test`).

        Returns the server's acceptance, e.g. "250 OK ...".

        Raises `SessionRefused` when the session cannot carry any mail (not open,
        sender or recipient refused, connection lost before the content went out) and
        `SendRejected` when the server answered this mail's content (4xx temporary,
        5xx permanent) or the connection died while it went out (451: it may or may
        not have arrived; the outbox is closed then).
        """
        smtp = self._smtp
        if smtp is None:
            raise self._refused("the session is not open")
        sha256 = str(message.get(RELAY_HEADER, ""))
        content = message.as_bytes(policy=policy.SMTP)

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
            code, answer = _data(smtp, content)
        except smtplib.SMTPDataError as exc:
            # The server refused the DATA command itself: an answer about this mail.
            self._reset_or_drop()
            raise SendRejected(
                _answer(exc.smtp_code, exc.smtp_error), code=exc.smtp_code, sha256=sha256
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Part or all of the mail went out and no answer came back: the server may
            # have accepted it. Temporary, so it is retried under the same Message-ID.
            self._drop()
            raise SendRejected(
                f"connection lost during send: {_open_failure_reason(exc, timeout=self._timeout)}",
                code=LOST_DURING_SEND,
                sha256=sha256,
            ) from exc

        if 200 <= code < 300:
            return _answer(code, answer)
        self._reset_or_drop()
        # Neither 2xx, 4xx nor 5xx after the content is a broken server; retry later.
        rejected_code = code if 400 <= code < 600 else LOST_DURING_SEND
        raise SendRejected(_answer(code, answer), code=rejected_code, sha256=sha256)

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


_DATA_CHUNK = 1 << 20
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _data(smtp: smtplib.SMTP, content: bytes) -> tuple[int, bytes]:
    """`smtp.data(content)` without its three whole-message copies (100 MB for a 25 MB
    PDF): 1 MiB slices, each ending after a line break, dot-stuffed one by one."""
    smtp.putcmd("data")
    code, answer = smtp.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, answer)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"  # the terminating dot must start a line
    start = 0
    view = memoryview(content)
    while start < len(content):
        end = content.find(b"\n", min(start + _DATA_CHUNK, len(content)) - 1)
        end = len(content) if end < 0 else end + 1
        piece = _LEADING_DOT.sub(b"..", view[start:end].tobytes())
        if end == len(content):
            # With the last slice, not after it: a lone small write waits on Nagle's
            # algorithm and the receiver's delayed ACK (40 ms a mail).
            piece += b".\r\n"
        smtp.send(piece)
        start = end
    return smtp.getreply()


def _discard(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.close()
    except OSError:
        logger.debug("closing the smtp socket failed", exc_info=True)
