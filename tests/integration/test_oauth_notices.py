"""A revoked OAuth2 grant and the failure notice (README, "Failure notices"): the notice
goes out when its transport does not need the credential that failed (SMTP with a
password), and is not attempted when it would need that very credential (SMTP on the
same OAuth2 grant), where `check` and `/healthz` carry the message instead.

Real servers: Dovecot validating tokens locally, the token server whose grant was
revoked, and an SMTP sink taking a password or only XOAUTH2; default settings (one
notice per INVOICE_RELAY_NOTIFY_INTERVAL, an hour).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_oauth_relay import (
    MAILBOX,
    invoice,
    microsoft_delegated,
    oauth_env,
)
from tests.integration.test_relay import FORWARD_TO, relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.tls import TestCA
from tests.servers.token_server import TokenServer

NOTIFY_TO = "owner@shop.example"
SMTP_USER = "relay@shop.example"
SMTP_PASSWORD = "smtp-" + secrets.token_hex(6)


@pytest.fixture
def password_smtp(smtp_ca: TestCA) -> Iterator[SmtpSink]:
    with running_sink(
        tls_cert=(smtp_ca.cert_file, smtp_ca.key_file), auth=(SMTP_USER, SMTP_PASSWORD)
    ) as sink:
        yield sink


def revoked_grant(token_server: TokenServer) -> str:
    token_server.add_client("desktop-1", mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    token_server.revoke_all()  # as an administrator revoking the user's sessions
    return configured


def test_the_notice_goes_by_the_password_smtp_transport(
    oauth_imap: DovecotServer,
    password_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    configured = revoked_grant(token_server)
    oauth_imap.deliver(invoice("7001"))
    key_file = tmp_path / "secret.key"
    key_file.write_text(secrets.token_urlsafe(32))
    env = relay_env(
        oauth_imap,
        password_smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_IMAP_AUTH="oauth2",
        INVOICE_RELAY_SMTP_USER=SMTP_USER,
        INVOICE_RELAY_SMTP_PASSWORD=SMTP_PASSWORD,
        INVOICE_RELAY_SECRET_KEY_FILE=str(key_file),
        INVOICE_RELAY_NOTIFY_TO=NOTIFY_TO,
        **microsoft_delegated(token_server, configured),
    )
    del env["INVOICE_RELAY_IMAP_PASSWORD"]

    first = run_relay(env, "once")

    assert first.returncode == 1
    assert "run `invoice-relay oauth login`" in first.stderr
    (notice,) = password_smtp.messages
    assert notice.rcpt_tos == (NOTIFY_TO,)
    assert password_smtp.logins == [SMTP_USER]  # over the password login
    subject = f"invoice-relay: cannot log in to {MAILBOX}@localhost/INBOX - please act"
    assert notice.message["Subject"] == subject
    body = notice.message.get_content()
    assert "The OAuth2 grant was refused" in body
    assert "run `invoice-relay oauth login` or replace INVOICE_RELAY_OAUTH_REFRESH_TOKEN" in body
    assert configured not in body
    assert notice.message["X-Invoice-Relay-Notice"] == "v1; rows=0"
    # The next run, minutes later, sends none: one notice per INVOICE_RELAY_NOTIFY_INTERVAL
    # (the next interval's reminder: tests/unit/relay/test_notify.py).
    again = run_relay(env, "once")
    assert again.returncode == 1
    assert len(password_smtp.messages) == 1
    assert not [mail for mail in password_smtp.messages if FORWARD_TO in mail.rcpt_tos]


def test_no_notice_is_tried_over_the_grant_that_failed(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    configured = revoked_grant(token_server)
    oauth_imap.deliver(invoice("7002"))
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        INVOICE_RELAY_NOTIFY_TO=NOTIFY_TO,
        **microsoft_delegated(token_server, configured),
    )

    result = run_relay(env, "once")

    assert result.returncode == 1
    assert oauth_smtp.messages == []
    assert oauth_smtp.logins == []
    # One token request: the IMAP login's. No second one for a notice's SMTP login.
    assert len(token_server.token_requests()) == 1
    # `check` carries the message instead (as /healthz does: test_oauth_relay.py).
    check = run_relay(env, "check")
    assert check.returncode == 1
    failed = [line for line in check.stdout.splitlines() if line.startswith("FAIL oauth2:")]
    assert failed, check.stdout
    assert all("invoice-relay oauth login" in line for line in failed)
    assert configured not in check.stdout + check.stderr
