"""`invoice-relay oauth login`: MSAL's authorization code flow with PKCE and state, the
redirect taken on 127.0.0.1 or pasted, the refresh token stored sealed and used after."""

from __future__ import annotations

import queue
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.servers.token_server import TokenServer, running_token_server
from worker.cli.oauth import login, oauth_logins
from worker.config.settings import Settings
from worker.errors import ConfigError, OAuthLoginRefused, RelayError
from worker.store import migrate
from worker.store.sqlstore import SqlStore
from worker.tokens import AuthMethod

MAILBOX = "invoices@shop.example"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path / "tokens") as running:
        running.add_client("desktop-1", mailbox=MAILBOX)
        yield running


@pytest.fixture
def settings(server: TokenServer, tmp_path: Path) -> Settings:
    key = tmp_path / "secret.key"
    key.write_text("k" * 40)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrate.upgrade_database(url)
    return Settings.from_env(
        {
            "INVOICE_RELAY_IMAP_HOST": "outlook.office365.com",
            "INVOICE_RELAY_IMAP_USER": MAILBOX,
            "INVOICE_RELAY_IMAP_AUTH": "oauth2",
            "INVOICE_RELAY_SMTP_HOST": "smtp.office365.com",
            "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
            "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
            "INVOICE_RELAY_DATABASE_URL": url,
            "INVOICE_RELAY_CA_FILE": str(server.ca_file),
            "INVOICE_RELAY_TIMEOUT": "10",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
            "INVOICE_RELAY_OAUTH_FLOW": "delegated",
            "INVOICE_RELAY_OAUTH_TENANT": "contoso.example",
            "INVOICE_RELAY_OAUTH_CLIENT_ID": "desktop-1",
            "INVOICE_RELAY_OAUTH_AUTHORITY": server.url,
        }
    )


class Person:
    """Reads the printed URL; signs in with a browser that follows the redirect to the
    relay's loopback port, or pastes the redirected address."""

    def __init__(self, server: TokenServer) -> None:
        self.server = server
        self.urls: queue.Queue[str] = queue.Queue()
        self.lines: queue.Queue[str] = queue.Queue()

    def show(self, text: str) -> None:
        self.urls.put(next(line.strip() for line in text.splitlines() if "://" in line))

    def pasted(self) -> str:
        try:
            return self.lines.get(timeout=30)
        except queue.Empty:
            return ""  # as the end of input: the reader stops

    def sign_in(self) -> str:
        """The authorization URL, and where the sign-in page redirects."""
        url = self.urls.get(timeout=30)
        context = ssl.create_default_context(cafile=str(self.server.ca_file))
        with httpx.Client(verify=context) as browser:
            answer = browser.get(url)
        assert answer.status_code == 302
        self.authorize_query = parse_qs(urlsplit(url).query)
        return answer.headers["location"]


def run_login(settings: Settings, person: Person) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def target() -> None:
        store = SqlStore(settings.database_url.reveal())
        try:
            outcome.append(login(settings, store, show=person.show, pasted=person.pasted))
        except RelayError as exc:  # handed to the test thread to assert on
            outcome.append(exc)
        finally:
            store.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_the_browser_redirect_to_the_loopback_port(server: TokenServer, settings: Settings) -> None:
    server.consenting_user = MAILBOX
    person = Person(server)
    thread, outcome = run_login(settings, person)
    location = person.sign_in()
    assert location.startswith("http://localhost:")
    # PKCE S256 and a state went to the authorization endpoint.
    assert person.authorize_query["code_challenge_method"] == ["S256"]
    assert person.authorize_query["state"][0]
    with httpx.Client() as browser:
        page = browser.get(location.replace("localhost", "127.0.0.1", 1))
    assert page.status_code == 200
    person.lines.put("")  # the person presses nothing; end of input
    thread.join(timeout=30)
    assert outcome == [MAILBOX]
    code_grant = [item for item in server.token_requests() if item.form.get("code")]
    assert code_grant[0].form["code_verifier"]
    assert code_grant[0].headers["x-client-sku"] == "MSAL.Python"
    # The stored refresh token is the one used from now on.
    assert settings.imap_auth is AuthMethod.OAUTH2
    store = SqlStore(settings.database_url.reveal())
    try:
        logins = oauth_logins(settings, store)
        assert logins is not None and logins.imap is not None
        try:
            token = logins.imap.tokens.access_token()
            fresh = logins.imap.tokens.access_token(refused=token)
        finally:
            logins.sources.close()
    finally:
        store.close()
    assert server.is_valid(fresh.value)
    refreshed = [item for item in server.token_requests() if item.form.get("refresh_token")]
    assert len(refreshed) == 1


def test_the_redirected_address_pasted_back(server: TokenServer, settings: Settings) -> None:
    server.consenting_user = MAILBOX
    person = Person(server)
    thread, outcome = run_login(settings, person)
    location = person.sign_in()
    person.lines.put("not the address\n")
    person.lines.put(location + "\n")
    thread.join(timeout=30)
    assert outcome == [MAILBOX]


def test_a_refused_sign_in_and_a_foreign_state(server: TokenServer, settings: Settings) -> None:
    person = Person(server)
    thread, outcome = run_login(settings, person)
    location = person.sign_in()  # consenting_user unset: access_denied
    person.lines.put(location)
    thread.join(timeout=30)
    assert isinstance(outcome[0], OAuthLoginRefused)
    assert "access_denied" in str(outcome[0])

    server.consenting_user = MAILBOX
    thread, outcome = run_login(settings, person)
    location = person.sign_in()
    person.lines.put(location.replace("state=", "state=forged", 1))
    thread.join(timeout=30)
    assert isinstance(outcome[0], OAuthLoginRefused)
    assert "state differs" in str(outcome[0])


# --- Google and generic providers: the code grant with PKCE and state, without MSAL ---


@pytest.fixture(params=["google", "generic"])
def code_settings(request: pytest.FixtureRequest, server: TokenServer, tmp_path: Path) -> Settings:
    key = tmp_path / "secret.key"
    key.write_text("k" * 40)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrate.upgrade_database(url)
    provider = str(request.param)
    return Settings.from_env(
        {
            "INVOICE_RELAY_IMAP_HOST": "imap.gmail.com",
            "INVOICE_RELAY_IMAP_USER": MAILBOX,
            "INVOICE_RELAY_IMAP_AUTH": "oauth2",
            "INVOICE_RELAY_SMTP_HOST": "smtp.gmail.com",
            "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
            "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
            "INVOICE_RELAY_DATABASE_URL": url,
            "INVOICE_RELAY_CA_FILE": str(server.ca_file),
            "INVOICE_RELAY_TIMEOUT": "10",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_OAUTH_PROVIDER": provider,
            "INVOICE_RELAY_OAUTH_FLOW": "delegated",
            "INVOICE_RELAY_OAUTH_CLIENT_ID": "desktop-1",
            "INVOICE_RELAY_OAUTH_TOKEN_URL": server.token_url(),
            "INVOICE_RELAY_OAUTH_AUTHORIZE_URL": server.authorize_url,
            **(
                {"INVOICE_RELAY_OAUTH_SCOPE": "mail offline_access"}
                if provider == "generic"
                else {}
            ),
        }
    )


def test_google_and_generic_sign_in_and_the_stored_token_is_used(
    server: TokenServer, code_settings: Settings
) -> None:
    server.consenting_user = MAILBOX
    person = Person(server)
    thread, outcome = run_login(code_settings, person)
    location = person.sign_in()
    person.lines.put(location)
    thread.join(timeout=30)
    assert outcome == [MAILBOX]
    query = person.authorize_query
    assert query["code_challenge_method"] == ["S256"]
    assert query["state"][0] and query["code_challenge"][0]
    assert code_settings.oauth is not None
    if code_settings.oauth.provider.value == "google":
        # Without these Google gives no refresh token (or only the first time).
        assert query["access_type"] == ["offline"]
        assert query["prompt"] == ["consent"]
        assert query["scope"] == ["https://mail.google.com/"]
    else:
        assert query["scope"] == ["mail offline_access"]
    # The server checked the verifier against the challenge (it refuses a wrong one).
    (code_grant,) = [item for item in server.token_requests() if item.form.get("code")]
    assert code_grant.path == "/token"
    assert code_grant.form["redirect_uri"] == query["redirect_uri"][0]
    store = SqlStore(code_settings.database_url.reveal())
    try:
        logins = oauth_logins(code_settings, store)
        assert logins is not None and logins.imap is not None
        try:
            first = logins.imap.tokens.access_token()
            fresh = logins.imap.tokens.access_token(refused=first)
        finally:
            logins.sources.close()
    finally:
        store.close()
    assert server.is_valid(fresh.value)
    (refreshed,) = [item for item in server.token_requests() if item.form.get("refresh_token")]
    assert refreshed.path == "/token"


def test_a_code_sign_in_with_a_foreign_state_is_refused(
    server: TokenServer, code_settings: Settings
) -> None:
    server.consenting_user = MAILBOX
    person = Person(server)
    thread, outcome = run_login(code_settings, person)
    location = person.sign_in()
    person.lines.put(location.replace("state=", "state=forged", 1))
    thread.join(timeout=30)
    assert isinstance(outcome[0], OAuthLoginRefused)
    assert "state differs" in str(outcome[0])
    assert not [item for item in server.token_requests() if item.form.get("code")]


def test_a_generic_provider_needs_its_authorize_url(server: TokenServer, tmp_path: Path) -> None:
    key = tmp_path / "secret.key"
    key.write_text("k" * 40)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrate.upgrade_database(url)
    settings = Settings.from_env(
        {
            "INVOICE_RELAY_IMAP_HOST": "imap.example",
            "INVOICE_RELAY_IMAP_USER": MAILBOX,
            "INVOICE_RELAY_IMAP_AUTH": "oauth2",
            "INVOICE_RELAY_SMTP_HOST": "smtp.example",
            "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
            "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
            "INVOICE_RELAY_DATABASE_URL": url,
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_OAUTH_PROVIDER": "generic",
            "INVOICE_RELAY_OAUTH_FLOW": "delegated",
            "INVOICE_RELAY_OAUTH_CLIENT_ID": "desktop-1",
            "INVOICE_RELAY_OAUTH_TOKEN_URL": server.token_url(),
        }
    )
    person = Person(server)
    thread, outcome = run_login(settings, person)
    thread.join(timeout=30)
    assert isinstance(outcome[0], ConfigError)
    assert "INVOICE_RELAY_OAUTH_AUTHORIZE_URL" in str(outcome[0])
