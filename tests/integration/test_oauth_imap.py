"""Logging in to Dovecot with OAuth2: a token from the relay's token source, checked by
Dovecot's oauth2 passdb at the token server's introspection endpoint (RFC 7662).

The Dovecot here has no password passdb, so only a token the server issued opens it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import imapclient
import imapclient.exceptions
import pytest

from tests.servers.dovecot import DovecotServer, OAuth2Passdb, running_dovecot
from tests.servers.token_server import TokenServer, running_token_server
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.mail.sasl import Exchange, SaslError, login_with_token
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import AccessToken, OAuthFlow, OAuthProvider


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path / "tokens") as server:
        yield server


@pytest.fixture
def oauth_imap(tmp_path: Path, token_server: TokenServer) -> Iterator[DovecotServer]:
    passdb = OAuth2Passdb(
        introspection_url=token_server.introspection_url, ca_file=token_server.ca_file
    )
    with running_dovecot(tmp_path / "dovecot", tls=False, oauth2=passdb) as server:
        yield server


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


def app_token(token_server: TokenServer, sources: TokenSources, mailbox: str) -> str:
    token_server.add_client("app-1", secret="app-secret", mailbox=mailbox)
    client = OAuthClient(
        provider=OAuthProvider.MICROSOFT,
        flow=OAuthFlow.APP,
        tenant="contoso.example",
        client_id="app-1",
        client_secret="app-secret",
        authority=token_server.url,
    )
    return sources.source(client, user=mailbox).access_token().value


def connect(server: DovecotServer) -> imapclient.IMAPClient:
    return imapclient.IMAPClient(server.host, port=server.port, ssl=False, timeout=10)


def test_xoauth2_with_a_token_from_the_token_source(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    token = app_token(token_server, sources, oauth_imap.user)
    client = connect(oauth_imap)
    try:
        assert b"AUTH=XOAUTH2" in client.capabilities()
        client.oauth2_login(oauth_imap.user, token)
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()
    introspected = [item for item in token_server.requests if item.path == "/introspect"]
    assert [item.form.get("token") for item in introspected] == [token]


def test_oauthbearer_with_the_same_token(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    token = app_token(token_server, sources, oauth_imap.user)
    client = connect(oauth_imap)
    try:
        client.oauthbearer_login(oauth_imap.user, token)
        client.select_folder("INBOX")
    finally:
        client.logout()


@pytest.mark.parametrize("login", ["password", "unknown token", "another mailbox's token"])
def test_anything_but_the_mailboxs_token_is_refused(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources, login: str
) -> None:
    client = connect(oauth_imap)
    try:
        with pytest.raises(imapclient.exceptions.LoginError):
            if login == "password":
                client.login(oauth_imap.user, oauth_imap.password)
            elif login == "unknown token":
                client.oauth2_login(oauth_imap.user, "at-never-issued")
            else:
                token = app_token(token_server, sources, "someone-else@shop.example")
                client.oauth2_login(oauth_imap.user, token)
    finally:
        client.shutdown()


def test_the_adapters_exchange_keeps_dovecots_error_and_retries_once(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    """What the IMAP adapter will do: sasl_login with worker.mail.sasl's Exchange (not
    oauth2_login, which resends the token on the error challenge), and one retry with
    a fresh token after an invalid_token answer."""
    good = app_token(token_server, sources, oauth_imap.user)
    handed = ["at-revoked-early", good]

    class Tokens:
        def access_token(self, *, refused: AccessToken | None = None) -> AccessToken:
            return AccessToken(value=handed.pop(0), expires_at=datetime(2030, 1, 1, tzinfo=UTC))

    errors: list[SaslError | None] = []

    def attempt(token: AccessToken) -> SaslError | None:
        client = connect(oauth_imap)
        try:
            exchange = Exchange(mechanism="XOAUTH2", user=oauth_imap.user, token=token.value)
            try:
                client.sasl_login("XOAUTH2", exchange)
            except imapclient.exceptions.LoginError:
                errors.append(exchange.error)
                return exchange.error or SaslError(status="refused")
            client.select_folder("INBOX")
            return None
        finally:
            client.shutdown()

    assert login_with_token(Tokens(), attempt) is None
    assert len(errors) == 1
    assert errors[0] is not None and errors[0].token_refused
    assert handed == []
