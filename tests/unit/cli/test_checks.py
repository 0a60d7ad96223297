"""`invoice-relay check`: which fix each failure's line suggests."""

from __future__ import annotations

import pytest

from worker.cli.checks import advice
from worker.errors import (
    MailboxError,
    MailboxFolderError,
    MailboxLoginError,
    RelayError,
    SessionRefused,
    StoreError,
)


def imap(kind: type[MailboxError], detail: str) -> MailboxError:
    return kind(detail, host="imap.example", port=993)


def smtp(detail: str) -> SessionRefused:
    return SessionRefused(detail, host="smtp.example", port=587)


@pytest.mark.parametrize(
    ("error", "names"),
    [
        (imap(MailboxLoginError, "login refused"), ("IMAP_PASSWORD", "IMAP_USER")),
        (imap(MailboxFolderError, "Invoices: no such mailbox"), ("IMAP_FOLDER",)),
        (imap(MailboxError, "connection refused"), ("IMAP_HOST", "IMAP_PORT")),
        (imap(MailboxError, "no answer within 60s"), ("IMAP_HOST", "IMAP_PORT")),
        (
            imap(MailboxError, "TLS certificate not trusted (set INVOICE_RELAY_CA_FILE)"),
            ("IMAP_SECURITY", "CA_FILE"),
        ),
        (smtp("connection failed: Connection refused"), ("SMTP_HOST", "SMTP_PORT")),
        (smtp("TLS handshake failed: WRONG_VERSION_NUMBER"), ("SMTP_SECURITY", "CA_FILE")),
        (smtp("login refused: 535 bad credentials"), ("SMTP_USER", "SMTP_PASSWORD")),
        (smtp("sender relay@x refused (check INVOICE_RELAY_FORWARD_FROM): 550"), ("FORWARD_FROM",)),
        (StoreError("sqlite:////nope/relay.db: unable to open"), ("DATABASE_URL",)),
    ],
)
def test_advice_names_the_settings_to_check(error: RelayError, names: tuple[str, ...]) -> None:
    text = advice(error)
    for name in names:
        assert f"INVOICE_RELAY_{name}" in text, text


def test_a_class_message_listing_every_cause_does_not_mislead() -> None:
    # SessionRefused's own message mentions TLS and login; only the detail decides.
    assert "SMTP_HOST" in advice(smtp("connection failed: Connection refused"))
