"""What IMAP and SMTP log in with, per protocol (worker.cli.wiring.logins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.cli.test_oauth import ENV
from worker.cli.polling import dry_run
from worker.cli.wiring import imap_mailbox, logins, password_logins, smtp_outbox
from worker.config.settings import Settings
from worker.errors import ConfigError, StoreError
from worker.models import PasswordCredentials
from worker.store.sqlstore import SqlStore
from worker.tokens import TokenCredentials


def oauth_settings(tmp_path: Path, **changes: str) -> Settings:
    key = tmp_path / "key"
    key.write_text("x" * 40)
    environ = {
        **ENV,
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
        "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        **{f"INVOICE_RELAY_{name}": value for name, value in changes.items()},
    }
    return Settings.from_env({name: value for name, value in environ.items() if value})


@pytest.mark.parametrize(
    ("changes", "imap_kind", "smtp_kind"),
    [
        ({}, TokenCredentials, TokenCredentials),
        # Google Workspace shops often read with OAuth2 and send with an app password.
        ({"SMTP_AUTH": "password", "SMTP_PASSWORD": "pw"}, TokenCredentials, PasswordCredentials),
        ({"IMAP_AUTH": "password", "IMAP_PASSWORD": "pw"}, PasswordCredentials, TokenCredentials),
    ],
)
def test_each_protocol_logs_in_as_its_setting_says(
    store: SqlStore,
    tmp_path: Path,
    changes: dict[str, str],
    imap_kind: type[object],
    smtp_kind: type[object],
) -> None:
    settings = oauth_settings(tmp_path, **changes)
    with logins(settings, store) as made:
        assert isinstance(made.imap, imap_kind)
        assert isinstance(made.smtp, smtp_kind)
        assert isinstance(imap_mailbox(settings, made).credentials, imap_kind)
        assert "cs-secret" not in repr(smtp_outbox(settings, made)) + repr(made)


def test_password_settings_log_in_with_passwords(store: SqlStore, tmp_path: Path) -> None:
    settings = oauth_settings(
        tmp_path, IMAP_AUTH="", SMTP_AUTH="", IMAP_PASSWORD="pw", SMTP_PASSWORD="pw"
    )
    with logins(settings, store) as made:
        assert made == password_logins(settings)
        assert isinstance(made.imap, PasswordCredentials)


def test_an_oauth2_login_without_the_store_is_a_wiring_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the token store"):
        imap_mailbox(oauth_settings(tmp_path))


def test_a_dry_run_with_oauth2_needs_the_migrated_database(tmp_path: Path) -> None:
    # Its tokens would live only in memory: a rotated refresh token would be lost.
    with pytest.raises(StoreError, match="invoice-relay db upgrade"):
        dry_run(oauth_settings(tmp_path))
    assert not (tmp_path / "relay.db").exists()  # a dry run creates nothing
