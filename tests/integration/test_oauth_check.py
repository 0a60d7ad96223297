"""`invoice-relay check` gets a token for each OAuth2 login, and names the fix when the
token endpoint refuses."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.token_server import TokenServer, running_token_server
from worker.cli.checks import run_checks
from worker.config.settings import Settings
from worker.store import migrate


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TokenServer]:
    with running_token_server(tmp_path / "tokens") as running:
        yield running


def settings_for(server: TokenServer, tmp_path: Path, **changes: str) -> Settings:
    key = tmp_path / "secret.key"
    key.write_text("k" * 40)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrate.upgrade_database(url)
    return Settings.from_env(
        {
            "INVOICE_RELAY_IMAP_HOST": "127.0.0.1",
            "INVOICE_RELAY_IMAP_PORT": "1",  # nothing listens: only the oauth2 line matters
            "INVOICE_RELAY_IMAP_SECURITY": "none",
            "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
            "INVOICE_RELAY_IMAP_AUTH": "oauth2",
            "INVOICE_RELAY_SMTP_HOST": "127.0.0.1",
            "INVOICE_RELAY_SMTP_PORT": "1",
            "INVOICE_RELAY_SMTP_SECURITY": "none",
            "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
            "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
            "INVOICE_RELAY_DATABASE_URL": url,
            "INVOICE_RELAY_CA_FILE": str(server.ca_file),
            "INVOICE_RELAY_TIMEOUT": "5",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
            "INVOICE_RELAY_OAUTH_FLOW": "app",
            "INVOICE_RELAY_OAUTH_TENANT": "contoso.example",
            "INVOICE_RELAY_OAUTH_CLIENT_ID": "app-1",
            "INVOICE_RELAY_OAUTH_CLIENT_SECRET": "app-secret",
            "INVOICE_RELAY_OAUTH_AUTHORITY": server.url,
            **changes,
        }
    )


def oauth_line(settings: Settings) -> str:
    out = io.StringIO()
    run_checks(settings, send_test=None, out=out)
    return next(line for line in out.getvalue().splitlines() if "oauth2:" in line)


def test_check_gets_a_token(server: TokenServer, tmp_path: Path) -> None:
    server.add_client("app-1", secret="app-secret", mailbox="invoices@shop.example")
    line = oauth_line(settings_for(server, tmp_path))
    assert line.startswith("ok   oauth2: imap token for invoices@shop.example until ")
    assert len(server.token_requests()) == 1


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (
            "invalid_client",
            "check INVOICE_RELAY_OAUTH_CLIENT_ID and INVOICE_RELAY_OAUTH_CLIENT_SECRET",
        ),
        ("invalid_grant", "run `invoice-relay oauth login`"),
        (None, "check INVOICE_RELAY_OAUTH_AUTHORITY"),
    ],
)
def test_check_names_the_fix(
    server: TokenServer, tmp_path: Path, error: str | None, fix: str
) -> None:
    server.add_client("app-1", secret="app-secret", mailbox="invoices@shop.example")
    server.fail_next(error=error, status=400 if error else 503)
    line = oauth_line(settings_for(server, tmp_path))
    assert line.startswith("FAIL oauth2: ")
    assert f"to fix: {fix}" in line
    assert "app-secret" not in line
