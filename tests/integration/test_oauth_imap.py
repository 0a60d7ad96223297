"""Logging in to Dovecot with OAuth2: a token from the relay's token source, a JWT that
Dovecot's oauth2 passdb validates locally (signature, expiry, issuer, audience) with the
token server's public key, asking nobody; and, as some servers do, at the token server's
introspection endpoint (RFC 7662).

The Dovecot here has no password passdb, so only a token the server issued opens it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import imapclient
import imapclient.exceptions
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.servers.dovecot import DovecotServer, running_dovecot
from tests.servers.token_server import MAIL_AUDIENCE, TokenServer, running_token_server
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
    with running_dovecot(
        tmp_path / "dovecot", tls=False, oauth2=token_server.dovecot_passdb()
    ) as server:
        yield server


@pytest.fixture
def introspecting_imap(tmp_path: Path, token_server: TokenServer) -> Iterator[DovecotServer]:
    passdb = token_server.dovecot_passdb(local=False)
    with running_dovecot(tmp_path / "introspecting", tls=False, oauth2=passdb) as server:
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
    assert jwt.get_unverified_header(token)["kid"] == token_server.key_id
    # Validated by Dovecot alone: the token server was asked for the token, nothing else.
    assert [item.path for item in token_server.requests if item.method == "POST"] == [
        "/contoso.example/oauth2/v2.0/token"
    ]
    assert f"Login: user=<{oauth_imap.user}>, method=XOAUTH2" in oauth_imap.log()


def test_xoauth2_checked_at_the_introspection_endpoint(
    introspecting_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    token = app_token(token_server, sources, introspecting_imap.user)
    client = connect(introspecting_imap)
    try:
        client.oauth2_login(introspecting_imap.user, token)
        client.select_folder("INBOX")
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


def forged(token_server: TokenServer, user: str) -> str:
    """A token like the server's, with its key id, signed with another key."""
    now = int(time.time())
    claims = {
        "iss": token_server.issuer,
        "sub": user,
        "aud": MAIL_AUDIENCE,
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
    }
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": token_server.key_id})


@pytest.mark.parametrize(
    "login",
    [
        "password",
        "not a JWT",
        "another mailbox's token",
        "an expired token",
        "a token for another resource",
        "a token signed with another key",
    ],
)
def test_anything_but_the_mailboxs_valid_token_is_refused(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources, login: str
) -> None:
    user = oauth_imap.user
    if login == "another mailbox's token":
        token = app_token(token_server, sources, "someone-else@shop.example")
    elif login == "an expired token":
        # Issued two hours ago with the provider's one-hour lifetime.
        token = token_server.access_token(
            user=user,
            client_id="app-1",
            scope="https://outlook.office365.com/.default",
            issued_at=time.time() - 7200,
        )
    elif login == "a token for another resource":
        # A scope naming another API (Microsoft Graph) gives a token for that API.
        token_server.audience = "https://graph.microsoft.com"
        token = app_token(token_server, sources, user)
    elif login == "a token signed with another key":
        token = forged(token_server, user)
    else:
        token = "at-never-issued"
    client = connect(oauth_imap)
    try:
        with pytest.raises(imapclient.exceptions.LoginError):
            if login == "password":
                client.login(user, oauth_imap.password)
            else:
                client.oauth2_login(user, token)
    finally:
        client.shutdown()
    expected = {
        "an expired token": "Token has expired",
        "a token for another resource": "client_id not found in aud field",
        "a token signed with another key": "Bad signature",
        "another mailbox's token": "did not match",
    }.get(login)
    if expected is not None:  # Dovecot says why it refused the token
        assert expected in oauth_imap.log(), oauth_imap.log()[-2000:]


def test_the_same_token_opens_the_mailbox(
    oauth_imap: DovecotServer, token_server: TokenServer, sources: TokenSources
) -> None:
    """The refusals above are about the token: the mailbox's own opens it."""
    client = connect(oauth_imap)
    try:
        client.oauth2_login(oauth_imap.user, app_token(token_server, sources, oauth_imap.user))
    finally:
        client.logout()


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
