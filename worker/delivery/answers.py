"""What an SMTP server's answers and smtplib's failures mean, for `SmtpOutbox`.

Kept apart from the session so that the wording a person reads (which setting to check)
and the 4xx/5xx split live in one small place (the README's "SMTP answers").
"""

from __future__ import annotations

import smtplib
import socket
import ssl

from worker.errors import DeliveryDeferred, DeliveryRefused, DeliveryRejected
from worker.mail.text import clean_text

__all__ = ["answer", "failure_reason", "refusal"]


def _answer_text(answer: bytes | str) -> str:
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
    return clean_text(text, 500)


def answer(code: int, answer: bytes | str) -> str:
    """A server's answer as it may be shown: "250 OK ...", cleaned and capped."""
    return f"{code} {_answer_text(answer)}".strip()


def failure_reason(exc: Exception, *, timeout: float) -> str:
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
                f"{answer(exc.smtp_code, exc.smtp_error)}"
            )
        case smtplib.SMTPNotSupportedError():
            return (
                "the server offers no login (check INVOICE_RELAY_SMTP_USER and "
                f"INVOICE_RELAY_SMTP_SECURITY): {exc}"
            )
        case smtplib.SMTPResponseException():
            return f"the server refused: {answer(exc.smtp_code, exc.smtp_error)}"
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


def refusal(detail: str, *, code: int, sha256: str) -> DeliveryRefused:
    """A reply to this mail's content: 5xx refuses it for good, anything else for now."""
    if 500 <= code < 600:
        return DeliveryRejected(detail, code=code, sha256=sha256)
    return DeliveryDeferred(detail, code=code, sha256=sha256)
