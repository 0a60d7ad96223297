"""From the settings to the IMAP and SMTP token credentials (worker.cli.oauth)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.auth.crypto import Sealer
from worker.cli.main import main
from worker.cli.oauth import oauth_client, oauth_logins
from worker.config.settings import Settings
from worker.store import migrate
from worker.store.sqlstore import SqlStore
from worker.store.tokens import TokenStore
from worker.tokens import OAuthFlow, OAuthProvider, StoredToken, TokenIdentity

ENV = {
    "INVOICE_RELAY_IMAP_HOST": "outlook.office365.com",
    "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
    "INVOICE_RELAY_IMAP_AUTH": "oauth2",
    "INVOICE_RELAY_SMTP_HOST": "smtp.office365.com",
    "INVOICE_RELAY_SMTP_USER": "relay@shop.example",
    "INVOICE_RELAY_SMTP_AUTH": "oauth2",
    "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
    "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
    "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
    "INVOICE_RELAY_OAUTH_FLOW": "app",
    "INVOICE_RELAY_OAUTH_TENANT": "contoso.onmicrosoft.com",
    "INVOICE_RELAY_OAUTH_CLIENT_ID": "app-1",
    "INVOICE_RELAY_OAUTH_CLIENT_SECRET": "cs-secret",
}


def test_each_protocol_gets_its_own_users_token_source(store: SqlStore, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("x" * 40)
    settings = Settings.from_env(
        {
            **ENV,
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        }
    )
    logins = oauth_logins(settings, store)
    assert logins is not None
    try:
        assert logins.imap is not None and logins.smtp is not None
        assert logins.imap.user == "invoices@shop.example"
        assert logins.smtp.user == "relay@shop.example"
        assert "cs-secret" not in repr(logins)
    finally:
        logins.sources.close()


def test_password_settings_need_no_token_sources(store: SqlStore, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            **{key: value for key, value in ENV.items() if "AUTH" not in key},
            "INVOICE_RELAY_IMAP_PASSWORD": "pw",
            "INVOICE_RELAY_SMTP_PASSWORD": "pw",
            "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        }
    )
    assert oauth_logins(settings, store) is None


def test_the_settings_become_plain_values(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("x" * 40)
    settings = Settings.from_env(
        {
            **ENV,
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_DATABASE_URL": "sqlite:////tmp/x.db",
        }
    )
    assert settings.oauth is not None
    client = oauth_client(settings.oauth)
    assert client.provider is OAuthProvider.MICROSOFT
    assert client.flow is OAuthFlow.APP
    assert client.client_secret == "cs-secret"
    assert "cs-secret" not in repr(client)


def test_oauth_status_names_each_login_and_its_tokens_age_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_text("x" * 40)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    environ = {**ENV, "INVOICE_RELAY_SECRET_KEY_FILE": str(key), "INVOICE_RELAY_DATABASE_URL": url}
    migrate.upgrade_database(url)
    store = SqlStore(url)
    sealer = Sealer.from_file(key)
    identity = TokenIdentity(
        provider=OAuthProvider.MICROSOFT,
        tenant="contoso.onmicrosoft.com",
        client_id="app-1",
        user="invoices@shop.example",
    )
    with TokenStore(store.engine).lock_token(identity.key()) as locked:
        locked.save(
            StoredToken(
                key=identity.key(),
                sealed_access=sealer.seal("at-secret", bound_to=identity.key()),
                access_expires_at=datetime(2026, 12, 1, 13, 0, tzinfo=UTC),
                refreshed_at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC),
            )
        )
    store.close()
    assert main(["oauth", "status"], environ) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "imap: microsoft app as invoices@shop.example (client app-1, tenant "
        "contoso.onmicrosoft.com): refreshed 2026-12-01T12:00:00+00:00, access token until "
        "2026-12-01T13:00:00+00:00",
        "smtp: microsoft app as relay@shop.example (client app-1, tenant "
        "contoso.onmicrosoft.com): no token stored yet",
    ]
    assert "at-secret" not in out and "cs-secret" not in out
