"""Pure helpers of the status page's answers: the templates (escaping by default), how
a stranger's text is shown, the session key, and a PDF's Content-Disposition."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from email.utils import quote as quote_header
from importlib.resources import files
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape

from worker.mail.text import clean_text
from worker.models import AttemptOutcome, DocumentState, Outcome

TEXT_CAP = 200  # characters of a stranger's text shown in one cell


def shown(value: object, limit: int = TEXT_CAP) -> str:
    """A value for the page: control characters gone, capped; Jinja2 escapes it."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, Outcome | DocumentState | AttemptOutcome):
        return str(value.value)
    return clean_text(str(value), limit, mark_cut=True)


def templates() -> Environment:
    folder = files("worker.web") / "templates"
    environment = Environment(
        loader=FileSystemLoader(str(folder)),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    environment.filters["shown"] = shown
    return environment


def session_key(material: bytes) -> str:
    """The cookie-signing key, derived from INVOICE_RELAY_SECRET_KEY_FILE for this use
    only: the same file seals the stored OAuth2 tokens (worker.auth.crypto)."""
    return hmac.new(material, b"invoice-relay web sessions v1", hashlib.sha256).hexdigest()


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback and the real name as RFC 8187 `filename*`; always an
    attachment, so a browser never renders a stranger's PDF inside the page."""
    cleaned = clean_text(filename, 150) or "invoice.pdf"
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in cleaned
    )
    return (
        f'attachment; filename="{quote_header(fallback)}"; '
        f"filename*=UTF-8''{quote(cleaned, safe='')}"
    )
