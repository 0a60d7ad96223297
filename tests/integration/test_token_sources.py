"""Each OAuth2 flow against the local token server, through the libraries unmodified.

The server is checked against RFC 6749 first (§5.1 success, §5.2 errors), so the flows'
tests rest on an endpoint that answers as the RFC says.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers.token_server import (
    CLIENT_ASSERTION,
    TokenServer,
    make_client_certificate,
    running_token_server,
)
from worker.auth.crypto import Sealer
from worker.auth.sources import OAuthClient, TokenSources
from worker.errors import OAuthClientRejected, OAuthLoginRefused, TokenEndpointError
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import OAuthFlow, OAuthProvider

TENANT = "contoso.example"
MAILBOX = "invoices@shop.example"
# RFC 6749 §5.2: error and error_description are %x20-21 / %x23-5B / %x5D-7E.
_RFC_TEXT = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_RFC_ERRORS = {
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path) as running:
        yield running


@pytest.fixture
def sources(server: TokenServer, tmp_path: Path) -> Iterator[TokenSources]:
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    store_engine.create_schema(engine)
    with TokenSources(
        rows=TokenStore(engine),
        sealer=Sealer(b"k" * 32),
        ca_file=server.ca_file,
        timeout_seconds=5.0,
    ) as made:
        yield made
    engine.dispose()


def microsoft_app(server: TokenServer, **changes: object) -> OAuthClient:
    values: dict[str, object] = {
        "provider": OAuthProvider.MICROSOFT,
        "flow": OAuthFlow.APP,
        "tenant": TENANT,
        "client_id": "app-1",
        "client_secret": "app-secret-value",
        "authority": server.url,
    }
    values.update(changes)
    return OAuthClient(**values)  # type: ignore[arg-type]


# --- the server answers as RFC 6749 says ------------------------------------------------


def _post(server: TokenServer, form: dict[str, str]) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file))) as client:
        return client.post(server.token_url(TENANT), data=form)


def test_a_success_has_the_shape_of_rfc6749_5_1(server: TokenServer) -> None:
    server.add_client("app-1", secret="s", mailbox=MAILBOX)
    response = _post(
        server, {"grant_type": "client_credentials", "client_id": "app-1", "client_secret": "s"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert isinstance(body["access_token"], str) and body["access_token"]
    assert body["token_type"].lower() == "bearer"
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        (
            {"grant_type": "client_credentials", "client_id": "app-1", "client_secret": "x"},
            401,
            "invalid_client",
        ),
        ({"grant_type": "client_credentials", "client_id": "nobody"}, 401, "invalid_client"),
        (
            {
                "grant_type": "refresh_token",
                "client_id": "app-1",
                "client_secret": "s",
                "refresh_token": "rt-unknown",
            },
            400,
            "invalid_grant",
        ),
        (
            {"grant_type": "password", "client_id": "app-1", "client_secret": "s"},
            400,
            "unsupported_grant_type",
        ),
    ],
)
def test_an_error_has_the_shape_of_rfc6749_5_2(
    server: TokenServer, form: dict[str, str], status: int, error: str
) -> None:
    server.add_client("app-1", secret="s", mailbox=MAILBOX)
    response = _post(server, form)
    # §5.2: 400, or 401 for a client that authenticated and failed.
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error
    assert body["error"] in _RFC_ERRORS
    assert set(body) <= {"error", "error_description", "error_uri"}
    assert _RFC_TEXT.fullmatch(body["error_description"])


def test_an_injected_error_is_rfc_shaped_too(server: TokenServer) -> None:
    server.fail_next(error="invalid_grant")
    body = _post(server, {"grant_type": "client_credentials"}).json()
    assert body["error"] == "invalid_grant"
    assert _RFC_TEXT.fullmatch(body["error_description"])


# --- Microsoft, through MSAL ------------------------------------------------------------


def test_the_app_flow_asks_through_msal(server: TokenServer, sources: TokenSources) -> None:
    server.add_client("app-1", secret="app-secret-value", mailbox=MAILBOX)
    token = sources.source(microsoft_app(server), user=MAILBOX).access_token()
    assert server.is_valid(token.value)
    issued = server.issued(token.value)
    assert issued is not None
    assert issued.scope == "https://outlook.office365.com/.default"
    paths = [(item.method, item.path) for item in server.requests]
    assert paths == [
        ("GET", f"/{TENANT}/v2.0/.well-known/openid-configuration"),
        ("POST", f"/{TENANT}/oauth2/v2.0/token"),
    ]
    asked = server.token_requests()[0]
    # The headers MSAL for Python sends with every token request.
    assert asked.headers["x-client-sku"] == "MSAL.Python"
    assert re.fullmatch(r"\d+\.\d+\.\d+", asked.headers["x-client-ver"])
    assert "x-client-current-telemetry" in asked.headers
    assert asked.form["grant_type"] == "client_credentials"


def test_the_app_flow_with_a_certificate_signs_a_client_assertion(
    server: TokenServer, sources: TokenSources, tmp_path: Path
) -> None:
    certificate = make_client_certificate(tmp_path / "app")
    server.add_client("app-2", certificate_pem=certificate.certificate_pem, mailbox=MAILBOX)
    client = microsoft_app(
        server, client_id="app-2", client_secret=None, client_cert_file=certificate.pem_file
    )
    token = sources.source(client, user=MAILBOX).access_token()
    assert server.is_valid(token.value)  # the server verified the assertion's signature
    form = server.token_requests()[0].form
    assert form["client_assertion_type"] == CLIENT_ASSERTION
    assert "client_secret" not in form


def test_a_wrong_secret_is_named_as_such_and_never_shown(
    server: TokenServer, sources: TokenSources
) -> None:
    server.add_client("app-1", secret="the-right-one", mailbox=MAILBOX)
    with pytest.raises(OAuthClientRejected) as caught:
        sources.source(microsoft_app(server), user=MAILBOX).access_token()
    text = str(caught.value)
    assert "client id app-1" in text
    assert "app-secret-value" not in text + repr(caught.value)
    assert caught.value.client_id == "app-1"


def test_an_unknown_tenant_is_refused_before_any_token_request(
    server: TokenServer, sources: TokenSources
) -> None:
    server.add_client("app-1", secret="app-secret-value", mailbox=MAILBOX)
    with pytest.raises(TokenEndpointError, match="was not accepted"):
        sources.source(microsoft_app(server, tenant="other.example"), user=MAILBOX).access_token()
    assert server.token_requests() == []


def test_delegated_rotates_the_refresh_token_on_every_use(
    server: TokenServer, sources: TokenSources
) -> None:
    server.add_client("desktop-1", mailbox=MAILBOX)
    first_refresh = server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    client = microsoft_app(
        server,
        flow=OAuthFlow.DELEGATED,
        client_id="desktop-1",
        client_secret=None,
        refresh_token=first_refresh,
    )
    source = sources.source(client, user=MAILBOX)
    token = source.access_token()
    for _ in range(3):  # three logins in a row, each refused as expired
        assert source.access_token() == token  # reused while it is good
        token = source.access_token(refused=token)
        assert server.is_valid(token.value)
    spent = [item.form["refresh_token"] for item in server.token_requests()]
    assert len(spent) == 4
    assert len(set(spent)) == 4  # never the same refresh token twice: none was revoked
    assert spent[0] == first_refresh
    assert server.token_requests()[0].headers["x-client-sku"] == "MSAL.Python"


def test_a_revoked_grant_is_a_login_failure_naming_the_fix(
    server: TokenServer, sources: TokenSources
) -> None:
    server.add_client("desktop-1", mailbox=MAILBOX)
    refresh = server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    client = microsoft_app(
        server,
        flow=OAuthFlow.DELEGATED,
        client_id="desktop-1",
        client_secret=None,
        refresh_token=refresh,
    )
    server.revoke_all()
    with pytest.raises(OAuthLoginRefused) as caught:
        sources.source(client, user=MAILBOX).access_token()
    assert "the default route: run `invoice-relay oauth login`" in str(caught.value)
    assert refresh not in str(caught.value)


# --- Google and generic -----------------------------------------------------------------


def test_a_google_service_account_acts_as_the_mailbox(
    server: TokenServer, sources: TokenSources, tmp_path: Path
) -> None:
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(server.add_service_account(subjects=frozenset({MAILBOX}))))
    client = OAuthClient(
        provider=OAuthProvider.GOOGLE,
        flow=OAuthFlow.SERVICE_ACCOUNT,
        service_account_file=key_file,
        token_url=server.token_url(),
    )
    token = sources.source(client, user=MAILBOX).access_token()
    issued = server.issued(token.value)
    assert issued is not None
    assert issued.user == MAILBOX  # the JWT's sub, verified against the account's key
    assert issued.scope == "https://mail.google.com/"
    with pytest.raises(TokenEndpointError, match="unauthorized_client"):
        sources.source(client, user="someone-else@shop.example").access_token()


def test_a_generic_refresh_grant(server: TokenServer, sources: TokenSources) -> None:
    server.add_client("generic-1", secret="generic-secret")
    refresh = server.issue_refresh_token(user=MAILBOX, client_id="generic-1")
    client = OAuthClient(
        provider=OAuthProvider.GENERIC,
        flow=OAuthFlow.DELEGATED,
        client_id="generic-1",
        client_secret="generic-secret",
        refresh_token=refresh,
        token_url=server.token_url(),
        scopes=("mail",),
    )
    source = sources.source(client, user=MAILBOX)
    first = source.access_token()
    second = source.access_token(refused=first)
    assert server.is_valid(second.value)
    spent = [item.form["refresh_token"] for item in server.token_requests()]
    assert spent[0] == refresh and spent[1] != refresh


# --- outages ------------------------------------------------------------------------------


def test_a_stalled_endpoint_is_an_outage_bounded_by_the_timeout(
    server: TokenServer, tmp_path: Path
) -> None:
    server.add_client("app-1", secret="app-secret-value", mailbox=MAILBOX)
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'stall.db'}")
    store_engine.create_schema(engine)
    with (
        TokenSources(
            rows=TokenStore(engine),
            sealer=Sealer(b"k" * 32),
            ca_file=server.ca_file,
            timeout_seconds=1.0,
        ) as sources,
        server.stalled(),
    ):
        started = time.monotonic()
        with pytest.raises(TokenEndpointError, match="no answer in time") as caught:
            sources.source(microsoft_app(server), user=MAILBOX).access_token()
        elapsed = time.monotonic() - started
    engine.dispose()
    assert type(caught.value) is TokenEndpointError  # transient: not a login failure
    assert elapsed < 3.0


@pytest.mark.parametrize("flow", ["microsoft", "google"])
def test_a_500_is_a_transient_outage(
    server: TokenServer, sources: TokenSources, tmp_path: Path, flow: str
) -> None:
    server.add_client("app-1", secret="app-secret-value", mailbox=MAILBOX)
    if flow == "microsoft":
        client = microsoft_app(server)
    else:
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps(server.add_service_account(subjects=frozenset({MAILBOX}))))
        client = OAuthClient(
            provider=OAuthProvider.GOOGLE,
            flow=OAuthFlow.SERVICE_ACCOUNT,
            service_account_file=key_file,
            token_url=server.token_url(),
        )
    server.fail_next(status=500, count=10)
    with pytest.raises(TokenEndpointError) as caught:
        sources.source(client, user=MAILBOX).access_token()
    assert type(caught.value) is TokenEndpointError


def test_the_test_ca_is_trusted_only_through_the_ca_file(
    server: TokenServer, tmp_path: Path
) -> None:
    server.add_client("app-1", secret="app-secret-value", mailbox=MAILBOX)
    engine = store_engine.make_engine(f"sqlite:///{tmp_path / 'trust.db'}")
    store_engine.create_schema(engine)
    with (
        TokenSources(
            rows=TokenStore(engine), sealer=Sealer(b"k" * 32), ca_file=None, timeout_seconds=5.0
        ) as untrusting,
        pytest.raises(TokenEndpointError, match="ConnectError"),
    ):
        untrusting.source(microsoft_app(server), user=MAILBOX).access_token()
    engine.dispose()
