"""From the settings to the IMAP and SMTP token credentials (worker.cli.oauth)."""

from __future__ import annotations

from pathlib import Path

from worker.cli.oauth import oauth_client, oauth_logins
from worker.config.settings import Settings
from worker.store.sqlstore import SqlStore
from worker.tokens import OAuthFlow, OAuthProvider

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
