"""Replicas sharing one identity: one refresh between them, never a spent token reused.

Each replica here has its own engine (its own database sessions) and its own HTTP
client, as separate processes would; they start together on a barrier while the token
server is slow, so the second asks while the first holds the identity's row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.servers.token_server import TokenServer, running_token_server
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.store import engine as store_engine
from worker.store import migrate
from worker.store.tokens import TokenStore
from worker.tokens import AccessToken, OAuthFlow, OAuthProvider

MAILBOX = "invoices@shop.example"
KEY = b"a shared key of at least 32 bytes, as from one file"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path) as running:
        yield running


def replicas_refresh_together(
    server: TokenServer, database_url: str, client: OAuthClient, count: int = 2
) -> list[AccessToken]:
    """A first token that has expired (got by a replica whose clock says two hours ago),
    then `count` replicas that all need a new one at once. The row exists, so only its
    lock keeps them apart (a first-ever row would also be serialised by its UNIQUE insert)."""
    migrate.upgrade_database(database_url)
    engine = store_engine.make_engine(database_url)
    try:
        with TokenSources(
            rows=TokenStore(engine),
            sealer=Sealer(KEY),
            ca_file=server.ca_file,
            timeout_seconds=20,
            clock=lambda: datetime.now(UTC) - timedelta(hours=2),
        ) as sources:
            sources.source(client, user=MAILBOX).access_token()
    finally:
        engine.dispose()
    barrier = threading.Barrier(count)

    def replica() -> AccessToken:
        engine = store_engine.make_engine(database_url)
        try:
            with TokenSources(
                rows=TokenStore(engine),
                sealer=Sealer(KEY),
                ca_file=server.ca_file,
                timeout_seconds=20.0,
            ) as sources:
                source = sources.source(client, user=MAILBOX)
                barrier.wait(timeout=20)
                return source.access_token()
        finally:
            engine.dispose()

    server.delay = 0.5  # the first refresh is still under way when the second asks
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(replica) for _ in range(count)]
        return [future.result(timeout=60) for future in futures]


def test_two_replicas_make_one_refresh_of_a_rotating_token(
    server: TokenServer, database_url: str
) -> None:
    server.add_client("desktop-1", mailbox=MAILBOX)
    refresh = server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    client = OAuthClient(
        provider=OAuthProvider.MICROSOFT,
        flow=OAuthFlow.DELEGATED,
        tenant="contoso.example",
        client_id="desktop-1",
        refresh_token=refresh,
        authority=server.url,
    )
    tokens = replicas_refresh_together(server, database_url, client)
    spent = [item.form["refresh_token"] for item in server.token_requests()]
    assert len(spent) == 2  # the first token's, then one refresh for both replicas
    assert len(set(spent)) == 2  # no spent token came back: the grant was not revoked
    assert tokens[0] == tokens[1]
    assert server.is_valid(tokens[0].value)


def test_three_app_replicas_make_one_token_request(server: TokenServer, database_url: str) -> None:
    server.add_client("app-1", secret="app-secret", mailbox=MAILBOX)
    client = OAuthClient(
        provider=OAuthProvider.MICROSOFT,
        flow=OAuthFlow.APP,
        tenant="contoso.example",
        client_id="app-1",
        client_secret="app-secret",
        authority=server.url,
    )
    tokens = replicas_refresh_together(server, database_url, client, count=3)
    assert len(server.token_requests()) == 2  # the first token's, then one for all three
    assert len({token.value for token in tokens}) == 1
