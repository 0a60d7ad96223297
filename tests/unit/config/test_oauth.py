"""The OAuth2 settings: checked at start-up, one line per problem naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config.settings import Settings
from worker.errors import ConfigError, ConfigProblems
from worker.tokens import AuthMethod, OAuthFlow, OAuthProvider

BASE = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example",
    "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
    "INVOICE_RELAY_SMTP_HOST": "smtp.example",
    "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
    "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
    "INVOICE_RELAY_DATABASE_URL": "sqlite:////tmp/relay.db",
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.key"
    path.write_text("k" * 44)
    return path


def problems(environ: dict[str, str]) -> dict[str, str]:
    try:
        Settings.from_env(environ)
    except ConfigProblems as exc:
        return {problem.variable: problem.problem for problem in exc.problems}
    except ConfigError as exc:
        return {exc.variable: exc.problem}
    return {}


def microsoft_app(key_file: Path, **extra: str) -> dict[str, str]:
    return {
        **BASE,
        "INVOICE_RELAY_IMAP_AUTH": "oauth2",
        "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
        "INVOICE_RELAY_OAUTH_FLOW": "app",
        "INVOICE_RELAY_OAUTH_TENANT": "contoso.onmicrosoft.com",
        "INVOICE_RELAY_OAUTH_CLIENT_ID": "00000000-1111-2222-3333-444444444444",
        "INVOICE_RELAY_OAUTH_CLIENT_SECRET": "client-secret-value",
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
        **extra,
    }


def test_a_microsoft_app_needs_no_imap_password(key_file: Path) -> None:
    settings = Settings.from_env(microsoft_app(key_file))
    assert settings.imap_auth is AuthMethod.OAUTH2
    assert settings.smtp_auth is AuthMethod.PASSWORD
    assert settings.oauth is not None
    assert settings.oauth.provider is OAuthProvider.MICROSOFT
    assert settings.oauth.flow is OAuthFlow.APP
    assert settings.oauth.authority == "https://login.microsoftonline.com"
    assert settings.secret_key_file == key_file.resolve()
    assert "client-secret-value" in settings.secret_values()
    assert "client-secret-value" not in repr(settings)
    assert "client-secret-value" not in str(settings.describe())


def test_password_logins_ignore_the_oauth_settings() -> None:
    settings = Settings.from_env({**BASE, "INVOICE_RELAY_IMAP_PASSWORD": "pw"})
    assert settings.oauth is None
    assert settings.imap_auth is AuthMethod.PASSWORD


@pytest.mark.parametrize(
    ("changes", "variable", "says"),
    [
        ({"INVOICE_RELAY_OAUTH_PROVIDER": ""}, "INVOICE_RELAY_OAUTH_PROVIDER", "required when"),
        ({"INVOICE_RELAY_OAUTH_FLOW": ""}, "INVOICE_RELAY_OAUTH_FLOW", "required when"),
        ({"INVOICE_RELAY_OAUTH_FLOW": "magic"}, "INVOICE_RELAY_OAUTH_FLOW", "not one of"),
        (
            {"INVOICE_RELAY_OAUTH_TENANT": "common"},
            "INVOICE_RELAY_OAUTH_TENANT",
            "not one organisation",
        ),
        (
            {"INVOICE_RELAY_OAUTH_TENANT": "Organizations"},
            "INVOICE_RELAY_OAUTH_TENANT",
            "not one organisation",
        ),
        (
            {"INVOICE_RELAY_OAUTH_TENANT": ""},
            "INVOICE_RELAY_OAUTH_TENANT",
            "required for microsoft",
        ),
        (
            {"INVOICE_RELAY_OAUTH_CLIENT_ID": ""},
            "INVOICE_RELAY_OAUTH_CLIENT_ID",
            "required for the app flow",
        ),
        (
            {"INVOICE_RELAY_OAUTH_CLIENT_SECRET": ""},
            "INVOICE_RELAY_OAUTH_CLIENT_SECRET",
            "either a client secret",
        ),
        (
            {"INVOICE_RELAY_OAUTH_PROVIDER": "google"},
            "INVOICE_RELAY_OAUTH_FLOW",
            "app is for OAUTH_PROVIDER=microsoft",
        ),
        ({"INVOICE_RELAY_SECRET_KEY_FILE": ""}, "INVOICE_RELAY_SECRET_KEY_FILE", "required when"),
        (
            {"INVOICE_RELAY_OAUTH_AUTHORITY": "http://login.example"},
            "INVOICE_RELAY_OAUTH_AUTHORITY",
            "https://",
        ),
        ({"INVOICE_RELAY_IMAP_AUTH": "kerberos"}, "INVOICE_RELAY_IMAP_AUTH", "not one of"),
        ({"INVOICE_RELAY_SMTP_AUTH": "oauth2"}, "INVOICE_RELAY_SMTP_USER", "required when"),
    ],
)
def test_one_line_per_problem_naming_the_variable(
    key_file: Path, changes: dict[str, str], variable: str, says: str
) -> None:
    found = problems(microsoft_app(key_file, **changes))
    assert variable in found, found
    assert says in found[variable]


def test_oauth2_without_provider_or_flow_lists_both(key_file: Path) -> None:
    environ = {
        **BASE,
        "INVOICE_RELAY_SMTP_AUTH": "oauth2",
        "INVOICE_RELAY_SMTP_USER": "relay@shop.example",
        "INVOICE_RELAY_IMAP_PASSWORD": "pw",
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
    }
    with pytest.raises(ConfigProblems) as caught:
        Settings.from_env(environ)
    lines = str(caught.value).splitlines()[1:]
    assert lines == [
        "  INVOICE_RELAY_OAUTH_PROVIDER: required when INVOICE_RELAY_IMAP_AUTH or _SMTP_AUTH is "
        "oauth2: microsoft, google or generic",
        "  INVOICE_RELAY_OAUTH_FLOW: required when INVOICE_RELAY_IMAP_AUTH or _SMTP_AUTH is "
        "oauth2: app, service_account or delegated",
    ]


def test_google_service_account(key_file: Path, tmp_path: Path) -> None:
    account = tmp_path / "sa.json"
    account.write_text("{}")
    environ = {
        **BASE,
        "INVOICE_RELAY_IMAP_AUTH": "oauth2",
        "INVOICE_RELAY_OAUTH_PROVIDER": "google",
        "INVOICE_RELAY_OAUTH_FLOW": "service_account",
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
    }
    assert problems(environ) == {
        "INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE": "required for the service_account flow"
    }
    settings = Settings.from_env(
        {**environ, "INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE": str(account)}
    )
    assert settings.oauth is not None
    assert settings.oauth.service_account_file == account.resolve()


def test_generic_delegated_needs_a_token_url_and_masks_the_refresh_token(key_file: Path) -> None:
    environ = {
        **BASE,
        "INVOICE_RELAY_IMAP_AUTH": "oauth2",
        "INVOICE_RELAY_OAUTH_PROVIDER": "generic",
        "INVOICE_RELAY_OAUTH_FLOW": "delegated",
        "INVOICE_RELAY_OAUTH_CLIENT_ID": "client-1",
        "INVOICE_RELAY_OAUTH_REFRESH_TOKEN": "rt-very-secret",
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
    }
    assert problems(environ) == {"INVOICE_RELAY_OAUTH_TOKEN_URL": "required for a generic provider"}
    settings = Settings.from_env(
        {**environ, "INVOICE_RELAY_OAUTH_TOKEN_URL": "https://id.example/token"}
    )
    assert settings.oauth is not None
    assert settings.oauth.refresh_token is not None
    assert settings.oauth.refresh_token.reveal() == "rt-very-secret"
    assert "rt-very-secret" in settings.secret_values()
    assert "rt-very-secret" not in repr(settings) + str(settings.describe())


def test_microsoft_delegated_may_use_common(key_file: Path) -> None:
    environ = microsoft_app(
        key_file,
        INVOICE_RELAY_OAUTH_FLOW="delegated",
        INVOICE_RELAY_OAUTH_TENANT="common",
        INVOICE_RELAY_OAUTH_CLIENT_SECRET="",
    )
    assert problems(environ) == {}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://id.example/authorize", "not an https:// URL"),
        ("https://user:pw@id.example/authorize", "must not carry a user or password"),
    ],
)
def test_the_authorize_url_must_be_https_without_credentials(
    key_file: Path, value: str, problem: str
) -> None:
    environ = microsoft_app(key_file, INVOICE_RELAY_OAUTH_AUTHORIZE_URL=value)
    assert problem in problems(environ)["INVOICE_RELAY_OAUTH_AUTHORIZE_URL"]


def test_the_authorize_url_is_kept(key_file: Path) -> None:
    environ = microsoft_app(key_file, INVOICE_RELAY_OAUTH_AUTHORIZE_URL="https://id.example/auth/")
    settings = Settings.from_env(environ)
    assert settings.oauth is not None
    assert settings.oauth.authorize_url == "https://id.example/auth"
