"""Two `once` processes on PostgreSQL sharing one OAuth2 identity, refreshing at the same
moment against a token endpoint that rotates refresh tokens and revokes the whole grant
when a spent one comes back (as Microsoft does): one refresh between them, both polls
succeed, over IMAP and SMTP.

Each process polls its own folder of the same mailbox (`INVOICE_RELAY_IMAP_FOLDER`), so
the poll locks do not keep them apart: only the identity's token row does. Neither has
a token yet, and the token endpoint takes two seconds to answer, so the second process
asks for a token while the first one's refresh is under way.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_oauth_relay import (
    MAILBOX,
    forwarded_names,
    invoice,
    microsoft_delegated,
    oauth_env,
)
from tests.integration.test_relay import run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.servers.token_server import TokenServer


@pytest.fixture
def postgres_env(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> Iterator[dict[str, str]]:
    """The relay's environment: the delegated flow, a migrated PostgreSQL database."""
    token_server.add_client("desktop-1", mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    with temporary_database() as url:
        env = oauth_env(
            oauth_imap,
            oauth_smtp,
            smtp_ca,
            tmp_path,
            INVOICE_RELAY_DATABASE_URL=url,
            **microsoft_delegated(token_server, configured),
        )
        assert run_relay(env, "db", "upgrade").returncode == 0
        yield env


def test_two_replicas_refresh_once_and_both_polls_succeed(
    postgres_env: dict[str, str],
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    token_server: TokenServer,
) -> None:
    env = postgres_env
    configured = env["INVOICE_RELAY_OAUTH_REFRESH_TOKEN"]
    oauth_imap.add_folder("Invoices")
    oauth_imap.deliver(invoice("8001"))
    oauth_imap.deliver(invoice("8002"), folder="Invoices")
    token_server.delay = 2.0  # the first refresh is still under way when the second asks

    replicas = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "once"],
            env={**env, "INVOICE_RELAY_IMAP_FOLDER": folder},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in ("INBOX", "Invoices")
    ]
    outputs = [replica.communicate(timeout=120) for replica in replicas]

    for replica, (stdout, stderr) in zip(replicas, outputs, strict=True):
        assert replica.returncode == 0, stderr[-2000:]
        assert stdout.startswith("read 1 new mail(s)"), stdout
    # Each read its folder; the documents are the store's, sent by whoever claimed them.
    assert sorted(forwarded_names(oauth_smtp)) == ["Invoice 8001.pdf", "Invoice 8002.pdf"]
    # One refresh for both processes, IMAP and SMTP: the configured token, spent once.
    spent = [item.form["refresh_token"] for item in token_server.token_requests()]
    assert spent == [configured]
    assert oauth_smtp.logins and set(oauth_smtp.logins) == {MAILBOX}
    # They did meet: one refreshed, the other found no token, waited for the row's lock
    # and then took the token the first had stored.
    logs = [stdout + stderr for stdout, stderr in outputs]
    assert sorted(text.count('"oauth_token_refreshed"') for text in logs) == [0, 1]
    assert sum(text.count('"oauth_token_shared"') for text in logs) == 1
    assert oauth_imap.log().count(f"Login: user=<{MAILBOX}>, method=XOAUTH2") == 2
    # The grant is alive: its rotated refresh token works (and was stored, not lost).
    token_server.delay = 0.0
    token_server.expire_access_tokens()
    oauth_imap.deliver(invoice("8003"))
    later = run_relay({**env, "INVOICE_RELAY_OAUTH_REFRESH_TOKEN": configured}, "once")
    assert later.returncode == 0, later.stderr[-2000:]
