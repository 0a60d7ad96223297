"""Logging set-up: JSON lines or readable text on stderr, secrets redacted everywhere.

Every record passes a `RedactingFilter` on our handler before it is formatted: the
message (with its arguments), the `extra=` fields, the traceback and the stack text lose
every string registered with `register_secret`, wherever in the process it was logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

MASK = "****"

# The route a poll serves: every line it logs carries it as the `route` field.
_ROUTE: ContextVar[str | None] = ContextVar("invoice_relay_route", default=None)

_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)

# Third-party loggers that chatter at INFO (or worse) about things users need not see.
QUIET_LOGGERS = {
    "apscheduler": logging.WARNING,
    "imapclient": logging.WARNING,
    "sqlalchemy": logging.WARNING,
    "alembic": logging.WARNING,
    "mail.log": logging.WARNING,  # aiosmtpd, in tests
    "pypdf": logging.ERROR,  # warns about every slightly malformed PDF
    "asyncio": logging.WARNING,
}

# The attributes every LogRecord has; anything else came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class SecretRegistry:
    """The strings that must never reach a log line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        if not value:
            return
        with self._lock:
            # Longest first, so a secret that contains another is masked whole.
            self._secrets = tuple(
                sorted({*self._secrets, value}, key=lambda secret: (-len(secret), secret))
            )

    def clear(self) -> None:
        with self._lock:
            self._secrets = ()

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def __bool__(self) -> bool:
        return bool(self._secrets)


# --- URLs -------------------------------------------------------------------------


def url_passwords(url: str) -> list[str]:
    """Every password a URL carries, in its user info and its query string, as written."""
    passwords = [match[2] for match in _QUERY_PASSWORD.finditer(url)]
    split = _split_userinfo(url)
    if split is not None:
        passwords.insert(0, split[1])
    return [password for password in passwords if password]


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(before, password, after) of `scheme://user:password@rest`.

    The last "@" ends the password, so an unescaped "@" or "/" in it is still masked;
    a URL that only looks like it has a password is masked too much, never too little.
    """
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")
    if not separator or at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon:
        return None
    return f"{scheme}://{user}:", password, rest[at:]


def mask_url(url: str) -> str:
    """`url` with every password masked (user info and `password=` in the query), and
    only the passwords: the one URL masker, for settings, logs and error messages."""
    split = _split_userinfo(url)
    masked = url if split is None else f"{split[0]}{MASK}{split[2]}"
    return _QUERY_PASSWORD.sub(lambda match: match[1] + MASK, masked)


SECRETS = SecretRegistry()
_PLAIN = logging.Formatter()


def register_secret(value: str) -> None:
    """Mask `value` in every log record from now on (the CLI registers the passwords)."""
    SECRETS.add(value)


def register_secrets(values: Iterable[str]) -> None:
    for value in values:
        SECRETS.add(value)


@contextlib.contextmanager
def route_context(route: str) -> Iterator[None]:
    """Lines logged by this thread inside the block carry `route` (unless they name one)."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


class RedactingFilter(logging.Filter):
    """Renders each record's message and traceback once, then masks registered secrets."""

    def __init__(self, registry: SecretRegistry = SECRETS) -> None:
        super().__init__()
        self.registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        # Render now, so secrets inside arguments and tracebacks are masked before any
        # formatter (ours or another handler's) sees the record.
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            # A wrong format string must not turn a log call into a crash.
            message = f"{record.msg!s} (unformattable arguments: {record.args!r})"
        record.msg = self.registry.redact(message)
        record.args = None
        route = _ROUTE.get()
        if route is not None and not hasattr(record, "route"):
            record.route = route
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.registry.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.registry.redact(record.stack_info)
        for key, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self.registry.redact(value))
            elif not isinstance(value, bool | int | float) and value is not None:
                text = str(value)
                redacted = self.registry.redact(text)
                if redacted != text:
                    setattr(record, key, redacted)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The `extra=` fields of a record (action, uid, sha256, mailbox, ...)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL action message k=v ...`, traceback on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        extras = extra_fields(record)
        action = extras.pop("action", None)
        parts = [self.formatTime(record, "%H:%M:%S"), f"{record.levelname:<7}"]
        if action is not None:
            parts.append(_single_line(str(action)))
        parts.append(_single_line(record.getMessage()))
        parts.extend(f"{key}={_text_value(value)}" for key, value in extras.items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        return line


class _RelayHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `configure_logging` installed, so a second call replaces it."""


def configure_logging(fmt: str, level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) as `json` lines or readable `text`."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format {fmt!r} is not json or text")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = _RelayHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, quiet_level))


def _single_line(text: str) -> str:
    # A newline in a message would let a mail's subject forge a log line.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: object) -> str:
    text = _single_line(str(value))
    if not text or any(char.isspace() or char in '="' for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text
