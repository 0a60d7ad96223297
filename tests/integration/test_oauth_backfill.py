"""A backfill that outlasts its access tokens: the poll goes on, nothing is lost.

The servers here end what an expired token opened, as Exchange Online does: the IMAP
session is cut with `* BYE ... AccessTokenExpired` when its token expires
(tests/servers/token_expiry_proxy.py, in front of Dovecot, which validates each token
locally at login), and the SMTP sink refuses a MAIL FROM on a session whose token has
expired since its AUTH. The relay renews both sessions, between two commands, before
their tokens expire.

The token server issues 24-second access tokens. That is not a relay default made
short: how long an access token lives is the provider's decision (Microsoft 60-90
minutes, Google an hour, Keycloak 5 minutes by default), and the relay follows whatever
the token endpoint says in `expires_in`. A session is renewed a quarter of such a short
token's life before its end (a minute before, for an hour's token), which must be longer
than the time between two of the poll's commands (a batch's PDF checks): 6 s here. The
IMAP proxy adds two seconds to every command, as a far-away server would, and
INVOICE_RELAY_MAX_SENDS_PER_MINUTE (a user's limit, as a provider's sending quota
asks for) spreads the sending, so that reading and sending both outlast a token.
"""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_oauth_relay import (
    APP_SECRET,
    MAILBOX,
    forwarded_names,
    invoice,
    microsoft_app,
    oauth_env,
)
from tests.integration.test_relay import FORWARD_TO, run_relay
from tests.servers.dovecot import DovecotServer, running_dovecot
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.servers.token_expiry_proxy import running_expiry_proxy
from tests.servers.token_server import TokenServer

LIFETIME = 24  # seconds an access token lives: the provider's choice (see above)
MAILS = 230  # more than one batch of 200: a backfill, read and sent side by side


@pytest.fixture
def short_tokens(token_server: TokenServer) -> TokenServer:
    token_server.expires_in = LIFETIME
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    return token_server


@pytest.fixture
def local_imap(tmp_path: Path, short_tokens: TokenServer) -> Iterator[DovecotServer]:
    with running_dovecot(tmp_path / "dovecot", oauth2=short_tokens.dovecot_passdb()) as server:
        yield server


def wait_until_expired(server: TokenServer, token: str) -> None:
    deadline = time.monotonic() + server.expires_in + 10
    while server.is_valid(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.is_valid(token)


def app_token(server: TokenServer) -> str:
    return server.access_token(
        user=MAILBOX, client_id="app-1", scope="https://outlook.office365.com/.default"
    )


def test_the_servers_end_what_an_expired_token_opened(
    local_imap: DovecotServer, short_tokens: TokenServer, oauth_smtp: SmtpSink, smtp_ca: TestCA
) -> None:
    """The property the backfill test relies on: without a renewal, a session that
    outlives its token is lost, on IMAP and on SMTP. (A 3-second token: only the
    servers' side is under test here.)"""
    short_tokens.expires_in = 3
    with running_expiry_proxy(local_imap.port) as proxy:
        imap = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=30)
        token = app_token(short_tokens)
        sasl = f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()
        imap.authenticate("XOAUTH2", lambda _: sasl)
        imap.select("INBOX", readonly=True)
        smtp = smtplib.SMTP("localhost", oauth_smtp.port, timeout=30)
        smtp.starttls(context=ssl.create_default_context(cafile=str(smtp_ca.ca_file)))
        smtp.ehlo()
        smtp.auth("XOAUTH2", lambda _=None: sasl.decode(), initial_response_ok=True)
        wait_until_expired(short_tokens, token)
        deadline = time.monotonic() + 10
        while proxy.ended == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            with pytest.raises(imaplib.IMAP4.abort):
                imap.noop()
        finally:
            imap.shutdown()
        assert proxy.ended == 1
        code, _ = smtp.mail("relay@shop.example")
        assert code == 421
        assert oauth_smtp.expired_refusals == 1
        smtp.close()


def test_a_backfill_outlasting_its_tokens_forwards_everything_once(
    local_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    short_tokens: TokenServer,
    tmp_path: Path,
) -> None:
    names = [f"Invoice {9000 + number}.pdf" for number in range(MAILS)]
    for number in range(MAILS):
        local_imap.deliver(invoice(str(9000 + number)))
    with running_expiry_proxy(local_imap.port, latency_seconds=2.0) as proxy:
        env = oauth_env(
            local_imap,
            oauth_smtp,
            smtp_ca,
            tmp_path,
            INVOICE_RELAY_IMAP_PORT=str(proxy.port),
            INVOICE_RELAY_IMAP_SECURITY="none",
            INVOICE_RELAY_MAX_SENDS_PER_MINUTE="600",
            **microsoft_app(short_tokens),
        )
        started = time.monotonic()
        result = run_relay(env, "once")
        took = time.monotonic() - started
        ended = proxy.ended
        imap_logins = proxy.logins

    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(forwarded_names(oauth_smtp)) == sorted(names)  # each once
    assert all(mail.rcpt_tos == (FORWARD_TO,) for mail in oauth_smtp.messages)
    # The poll outlasted its tokens, and no session was used past its token's end.
    assert took > LIFETIME, took
    assert ended == 0
    assert oauth_smtp.expired_refusals == 0
    assert imap_logins >= 2, "the IMAP session was not renewed"
    assert len(oauth_smtp.logins) >= 2, "the SMTP session was not renewed"
    assert len(short_tokens.token_requests()) >= 2
    assert '"imap_session_renewed"' in result.stdout + result.stderr
    assert len(oauth_smtp.messages) == MAILS
