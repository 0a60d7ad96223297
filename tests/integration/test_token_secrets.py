"""Tokens and secrets never reach a log line, an error or a repr, whatever the flow and
however it fails: every logger (ours, MSAL's, google-auth's, httpx's) is captured at
DEBUG while each flow succeeds and fails against the token server."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.token_server import TokenServer, make_client_certificate, running_token_server
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.errors import TokenEndpointError
from worker.logs import JsonFormatter
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import OAuthFlow, OAuthProvider

MAILBOX = "invoices@shop.example"
CLIENT_SECRET = "cs-Sec7et-distinctive-1f2e3d"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path) as running:
        yield running


def test_no_token_or_secret_in_logs_errors_or_reprs(
    server: TokenServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    certificate = make_client_certificate(tmp_path / "cert")
    server.add_client("app-1", secret=CLIENT_SECRET, mailbox=MAILBOX)
    server.add_client("app-2", certificate_pem=certificate.certificate_pem, mailbox=MAILBOX)
    server.add_client("desktop-1", secret=CLIENT_SECRET, mailbox=MAILBOX)
    refresh = server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    account = server.add_service_account(subjects=frozenset({MAILBOX}))
    account_file = tmp_path / "sa.json"
    account_file.write_text(json.dumps(account))
    tenant, authority = "contoso.example", server.url
    clients = [
        OAuthClient(
            provider=OAuthProvider.MICROSOFT,
            flow=OAuthFlow.APP,
            client_id="app-1",
            client_secret=CLIENT_SECRET,
            tenant=tenant,
            authority=authority,
        ),
        OAuthClient(
            provider=OAuthProvider.MICROSOFT,
            flow=OAuthFlow.APP,
            client_id="app-2",
            client_cert_file=certificate.pem_file,
            tenant=tenant,
            authority=authority,
        ),
        OAuthClient(
            provider=OAuthProvider.MICROSOFT,
            flow=OAuthFlow.DELEGATED,
            client_id="desktop-1",
            client_secret=CLIENT_SECRET,
            refresh_token=refresh,
            tenant=tenant,
            authority=authority,
        ),
        OAuthClient(
            provider=OAuthProvider.GOOGLE,
            flow=OAuthFlow.SERVICE_ACCOUNT,
            service_account_file=account_file,
            token_url=server.token_url(),
        ),
        OAuthClient(
            provider=OAuthProvider.GENERIC,
            flow=OAuthFlow.DELEGATED,
            client_id="desktop-1",
            client_secret=CLIENT_SECRET,
            token_url=server.token_url(),
        ),
    ]
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    store_engine.create_schema(engine)
    shown: list[str] = []
    with TokenSources(
        rows=TokenStore(engine),
        sealer=Sealer(b"k" * 32),
        ca_file=server.ca_file,
        timeout_seconds=5.0,
    ) as sources:
        for client in clients:
            source = sources.source(client, user=MAILBOX)
            shown += [repr(client), str(client), repr(source)]
            try:
                token = source.access_token()
                shown += [repr(token), str(token)]
                token = source.access_token(refused=token)
            except TokenEndpointError as exc:  # the generic client has no refresh token
                shown += [str(exc), repr(exc)]
            for fault in ("invalid_grant", "invalid_client"):
                server.fail_next(error=fault)
                with pytest.raises(TokenEndpointError) as caught:
                    source.access_token(refused=token)
                shown += [str(caught.value), repr(caught.value), repr(caught.value.args)]
    engine.dispose()

    secrets = {CLIENT_SECRET, refresh, *server.handed_out()}
    secrets |= {line for line in account["private_key"].splitlines() if len(line) > 20}
    secrets |= {
        line
        for line in certificate.pem_file.read_text()
        .split("-----BEGIN PRIVATE KEY-----")[1]
        .splitlines()
        if len(line) > 20
    }
    formatter = JsonFormatter()
    logged = [formatter.format(record) for record in caplog.records]
    logged += [record.getMessage() for record in caplog.records]
    assert len(secrets) > 10
    # MSAL, httpx and httpcore log at DEBUG: the capture saw them.
    assert {"msal.application", "httpx", "worker.auth.cache"} <= {r.name for r in caplog.records}
    for text in shown + logged:
        for secret in secrets:
            assert secret not in text, (secret[:6], text[:200])
