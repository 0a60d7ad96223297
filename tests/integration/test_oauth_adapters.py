"""The IMAP and SMTP adapters given TokenCredentials, against Dovecot's oauth2 passdb and
the XOAUTH2-only sink: one retry with a fresh token after a refusal, then a classified
error that never holds a token; and an IDLE session renewed before its token expires."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.servers.dovecot import DovecotServer, running_dovecot
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.servers.token_server import TokenServer
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.delivery.smtp import SmtpOutbox
from worker.errors import MailboxTokenRefused, SessionRefused
from worker.imap.mailbox import ImapMailbox
from worker.models import Security
from worker.service.idle import IdleTiming, IdleWatcher
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import AccessToken, OAuthFlow, OAuthProvider, TokenCredentials, TokenSource

MAILBOX = "invoices@shop.example"
NEVER_ISSUED = "at-never-issued-by-the-server"


@pytest.fixture
def sources(tmp_path: Path, token_server: TokenServer) -> Iterator[TokenSources]:
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    store_engine.create_schema(engine)
    with TokenSources(
        rows=TokenStore(engine),
        sealer=Sealer(b"k" * 32),
        ca_file=token_server.ca_file,
        timeout_seconds=10.0,
    ) as made:
        yield made
    engine.dispose()


def app_source(token_server: TokenServer, sources: TokenSources) -> TokenSource:
    token_server.add_client("app-1", secret="app-secret", mailbox=MAILBOX)
    client = OAuthClient(
        provider=OAuthProvider.MICROSOFT,
        flow=OAuthFlow.APP,
        tenant="contoso.example",
        client_id="app-1",
        client_secret="app-secret",
        authority=token_server.url,
    )
    return sources.source(client, user=MAILBOX)


class Scripted:
    """A TokenSource handing out `first` (or, once refused, the real source's token)."""

    def __init__(self, first: str, then: TokenSource | None) -> None:
        self._first = AccessToken(value=first, expires_at=datetime.now(UTC) + timedelta(hours=1))
        self._then = then
        self.refused: list[str] = []

    def access_token(self, *, refused: AccessToken | None = None) -> AccessToken:
        if refused is None:
            return self._first
        self.refused.append(refused.value)
        return self._then.access_token() if self._then is not None else self._first


def imap_mailbox(server: DovecotServer, tokens: TokenSource) -> ImapMailbox:
    return ImapMailbox(
        host="localhost",
        port=server.tls_port or server.port,
        security=Security.SSL,
        credentials=TokenCredentials(user=MAILBOX, tokens=tokens),
        ca_file=server.ca_file,
        timeout=10,
    )


def smtp_outbox(sink: SmtpSink, tokens: TokenSource, smtp_ca: TestCA) -> SmtpOutbox:
    return SmtpOutbox(
        host="localhost",
        port=sink.port,
        security=Security.STARTTLS,
        credentials=TokenCredentials(user=MAILBOX, tokens=tokens),
        forward_from=MAILBOX,
        forward_to="inbox@getmyinvoices.example",
        ca_file=smtp_ca.ca_file,
        timeout=10,
    )


def test_imap_retries_a_refused_token_once_with_a_fresh_one(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    tokens = Scripted(NEVER_ISSUED, app_source(token_server, sources))
    mailbox = imap_mailbox(oauth_imap, tokens)
    try:
        assert mailbox.open().exists == 0
        expires_in = mailbox.token_expires_in()
        assert expires_in is not None and 3000 < expires_in <= 3600
    finally:
        mailbox.close()
    assert tokens.refused == [NEVER_ISSUED]
    assert mailbox.token_expires_in() is None  # no session, no token


def test_imap_refused_twice_is_a_token_refusal_without_the_token(
    oauth_imap: DovecotServer,
) -> None:
    tokens = Scripted(NEVER_ISSUED, None)
    mailbox = imap_mailbox(oauth_imap, tokens)
    with pytest.raises(MailboxTokenRefused) as caught:
        mailbox.open()
    assert tokens.refused == [NEVER_ISSUED]  # one retry, not a loop
    text = str(caught.value)
    # Dovecot's error challenge, kept by the Exchange: RFC 7628's JSON.
    assert f"XOAUTH2 as {MAILBOX} (401, scope mail): [AUTHENTICATIONFAILED]" in text, text
    assert NEVER_ISSUED not in text + repr(caught.value)


def test_imap_uses_oauthbearer_where_that_is_all_the_server_offers(
    tmp_path: Path, token_server: TokenServer, sources: TokenSources
) -> None:
    passdb = token_server.dovecot_passdb(mechanisms="oauthbearer")
    with running_dovecot(tmp_path / "bearer-only", oauth2=passdb) as server:
        mailbox = imap_mailbox(server, app_source(token_server, sources))
        try:
            assert mailbox.open().exists == 0
        finally:
            mailbox.close()
        assert f"Login: user=<{MAILBOX}>, method=OAUTHBEARER" in server.log()


def test_smtp_retries_a_refused_token_once_with_a_fresh_one(
    oauth_smtp: SmtpSink, token_server: TokenServer, sources: TokenSources, smtp_ca: TestCA
) -> None:
    tokens = Scripted(NEVER_ISSUED, app_source(token_server, sources))
    with smtp_outbox(oauth_smtp, tokens, smtp_ca):
        pass
    assert tokens.refused == [NEVER_ISSUED]
    assert oauth_smtp.logins == [MAILBOX]


def test_smtp_refused_twice_is_a_session_refusal_naming_the_fix(
    oauth_smtp: SmtpSink, smtp_ca: TestCA
) -> None:
    tokens = Scripted(NEVER_ISSUED, None)
    with pytest.raises(SessionRefused) as caught:
        smtp_outbox(oauth_smtp, tokens, smtp_ca).open()
    assert tokens.refused == [NEVER_ISSUED]
    text = str(caught.value)
    assert f"OAuth2 login as {MAILBOX} refused (XOAUTH2, 401): 535" in text
    assert "SMTP.SendAsApp" in text
    assert NEVER_ISSUED not in text + repr(caught.value)


def test_an_idle_session_is_renewed_with_a_fresh_token_before_its_token_expires(
    introspecting_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    # 20-second tokens: the token source keeps one for half its life (10 s), the watcher
    # renews the session a quarter of the time left before the end (at 15 s), when the
    # source has a fresh token to give.
    token_server.expires_in = 20
    tokens = app_source(token_server, sources)
    stop = threading.Event()
    watcher = IdleWatcher(
        mailbox=imap_mailbox(introspecting_imap, tokens),
        on_new_mail=lambda: None,
        stop=stop,
        timing=IdleTiming(check_seconds=0.2, first_backoff_seconds=0.2),
    )
    thread = watcher.start()
    try:
        deadline = time.monotonic() + 40
        while len(token_server.token_requests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        logged_in_with = _introspected(token_server)
        while len(logged_in_with) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            logged_in_with = _introspected(token_server)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert len(token_server.token_requests()) == 2
    first, second = logged_in_with[:2]
    assert first != second  # the new session logged in with the fresh token
    issued = token_server.issued(first)
    assert issued is not None
    assert "AccessTokenExpired" not in introspecting_imap.log()


def _introspected(server: TokenServer) -> list[str]:
    return [item.form["token"] for item in server.requests if item.path == "/introspect"]
