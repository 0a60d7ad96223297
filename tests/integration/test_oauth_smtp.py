"""SMTP AUTH XOAUTH2 with a token from the relay's token source, against an aiosmtpd sink
that offers nothing else, through smtplib and worker.mail.sasl's Exchange (what the SMTP
adapter will use): the initial response, and an empty line for the error challenge."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.token_server import TokenServer, running_token_server
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.mail.sasl import Exchange, SaslError
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import OAuthFlow, OAuthProvider

SENDER = "relay@shop.example"
LONG_TOKEN = "eyJ0eXAiOiJKV1Qi." + "A" * 2400 + ".sig"  # a Microsoft-sized JWT


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path) as server:
        yield server


@pytest.fixture
def sink(token_server: TokenServer) -> Iterator[SmtpSink]:
    def valid(user: str, token: str) -> bool:
        if token == LONG_TOKEN:
            return user == SENDER
        issued = token_server.issued(token)
        return token_server.is_valid(token) and issued is not None and issued.user == user

    with running_sink(oauth2=valid) as running:
        yield running


@pytest.fixture
def token(token_server: TokenServer, tmp_path: Path) -> Iterator[str]:
    token_server.add_client("app-1", secret="app-secret", mailbox=SENDER)
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    store_engine.create_schema(engine)
    client = OAuthClient(
        provider=OAuthProvider.MICROSOFT,
        flow=OAuthFlow.APP,
        tenant="contoso.example",
        client_id="app-1",
        client_secret="app-secret",
        authority=token_server.url,
    )
    with TokenSources(
        rows=TokenStore(engine),
        sealer=Sealer(b"k" * 32),
        ca_file=token_server.ca_file,
        timeout_seconds=10,
    ) as sources:
        yield sources.source(client, user=SENDER).access_token().value
    engine.dispose()


def login(sink: SmtpSink, exchange: Exchange) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["XOAUTH2"]
        smtp.auth("XOAUTH2", exchange.text, initial_response_ok=True)


@pytest.mark.parametrize("kind", ["token source", "2.4 KB token"])
def test_xoauth2_with_an_initial_response(sink: SmtpSink, token: str, kind: str) -> None:
    value = token if kind == "token source" else LONG_TOKEN
    exchange = Exchange(mechanism="XOAUTH2", user=SENDER, token=value)
    login(sink, exchange)
    assert exchange.error is None
    assert sink.logins == [SENDER]


def test_a_refused_token_ends_with_535_and_keeps_the_servers_error(
    sink: SmtpSink, token: str
) -> None:
    exchange = Exchange(mechanism="XOAUTH2", user="someone-else@shop.example", token=token)
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        login(sink, exchange)
    assert caught.value.smtp_code == 535
    assert exchange.error == SaslError(status="401", scope="SMTP.Send")
    assert sink.logins == []
