"""Pure parts of the status page: the client's address behind proxies, the audit
search from a query string, and the web settings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.config.settings import Settings
from worker.config.web import WebUser, networks
from worker.errors import ConfigError, ConfigProblems
from worker.models import AuditSearch, Outcome, RouteScope
from worker.web.auth import PasswordBook, client_address
from worker.web.search import page_numbers, search_from_query

PROXIES = networks("10.0.0.0/8, ::1")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("192.0.2.7", None, "192.0.2.7"),
        ("192.0.2.7", "203.0.113.1", "192.0.2.7"),  # not a trusted proxy: header ignored
        ("10.0.0.2", "203.0.113.1", "203.0.113.1"),
        ("10.0.0.2", "198.51.100.9, 203.0.113.1", "203.0.113.1"),  # the left is the client's say
        ("10.0.0.2", "203.0.113.1, 10.0.0.3", "203.0.113.1"),  # a chain of our proxies
        ("10.0.0.2", "not-an-ip", "10.0.0.2"),
        ("10.0.0.2", None, "10.0.0.2"),
        ("::1", "2001:db8::5", "2001:db8::5"),
        (None, None, "unknown"),
    ],
)
def test_forwarded_headers_count_only_from_trusted_proxies(
    peer: str | None, forwarded: str | None, expected: str
) -> None:
    headers = {} if forwarded is None else {"x-forwarded-for": forwarded}
    assert client_address(peer, headers, PROXIES) == expected


EVERYONE = RouteScope.everything()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, AuditSearch(scope=EVERYONE)),
        ({"invoice": " 1042 "}, AuditSearch(scope=EVERYONE, invoice_number="1042")),
        ({"outcome": "failed"}, AuditSearch(scope=EVERYONE, outcomes=(Outcome.FAILED,))),
        ({"outcome": "bogus"}, AuditSearch(scope=EVERYONE)),
        (
            {"from": "2026-12-01", "to": "2026-12-01"},
            AuditSearch(
                scope=EVERYONE,
                received_from=datetime(2026, 12, 1, tzinfo=UTC),
                received_before=datetime(2026, 12, 2, tzinfo=UTC),
            ),
        ),
        ({"from": "yesterday"}, AuditSearch(scope=EVERYONE)),
        ({"page": "3"}, AuditSearch(scope=EVERYONE, offset=100)),
        ({"page": "-1"}, AuditSearch(scope=EVERYONE)),
        ({"sender": "x" * 500}, AuditSearch(scope=EVERYONE, sender="x" * 200)),
    ],
)
def test_the_audit_search_from_a_query_string(
    params: dict[str, str], expected: AuditSearch
) -> None:
    assert search_from_query(params, EVERYONE) == expected


def test_the_csv_search_has_no_page_limit() -> None:
    search = search_from_query({"page": "4"}, EVERYONE, page_rows=None)
    assert (search.offset, search.limit) == (0, None)


@pytest.mark.parametrize(
    ("total", "current", "expected"),
    [(0, 1, [1]), (50, 1, [1]), (51, 1, [1, 2]), (1000, 10, [1, 8, 9, 10, 11, 12, 20])],
)
def test_page_links(total: int, current: int, expected: list[int]) -> None:
    assert list(page_numbers(total, 50, current)) == expected


@pytest.mark.parametrize(
    ("routes", "allowed", "refused"),
    [(["*"], "anything", None), (["shop-a"], "shop-a", "shop-b"), ([], None, "default")],
)
def test_route_scopes(routes: list[str], allowed: str | None, refused: str | None) -> None:
    scope = RouteScope.of(routes)
    if allowed is not None:
        assert scope.allows(allowed)
    if refused is not None:
        assert not scope.allows(refused)


def test_passwords_are_kept_as_hashes_and_checked() -> None:
    book = PasswordBook([WebUser(name="accountant", password="correct horse")])
    account = book.check("accountant", "correct horse")
    assert account is not None and account.name == "accountant"
    assert b"correct horse" not in account.digest
    assert "correct horse" not in repr(account)
    assert book.check("accountant", "wrong") is None
    assert book.check("nobody", "correct horse") is None


# --- settings ----------------------------------------------------------------------------

BASE = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example.com",
    "INVOICE_RELAY_IMAP_USER": "u",
    "INVOICE_RELAY_IMAP_PASSWORD": "p",
    "INVOICE_RELAY_SMTP_HOST": "smtp.example.com",
    "INVOICE_RELAY_FORWARD_TO": "in@example.com",
    "INVOICE_RELAY_FORWARD_FROM": "relay@example.com",
    "INVOICE_RELAY_DATABASE_URL": "sqlite:////tmp/relay.db",
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(b"s" * 48)
    return path


def test_no_web_user_means_no_status_page() -> None:
    assert Settings.from_env(BASE).web is None


def test_a_web_password_turns_the_page_on_for_one_user_of_every_route(key_file: Path) -> None:
    settings = Settings.from_env(
        BASE
        | {
            "INVOICE_RELAY_WEB_PASSWORD": "correct horse",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
            "INVOICE_RELAY_WEB_PUBLIC_URL": "https://relay.example.com/",
            "INVOICE_RELAY_WEB_TRUSTED_PROXIES": "10.0.0.0/8",
        }
    )
    web = settings.web
    assert web is not None
    assert web.port == 8081
    assert [(user.name, user.scope) for user in web.users] == [
        ("accountant", RouteScope.everything())
    ]
    assert web.https and web.public_origin == "https://relay.example.com"
    assert "correct horse" not in str(settings.describe())
    assert "s" * 48 not in str(settings.describe())
    assert "correct horse" in settings.secret_values()


def test_web_port_zero_turns_the_page_off(key_file: Path) -> None:
    settings = Settings.from_env(
        BASE
        | {
            "INVOICE_RELAY_WEB_PASSWORD": "pw",
            "INVOICE_RELAY_WEB_PORT": "0",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
        }
    )
    assert settings.web is None


def test_the_page_needs_a_secret_key() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(BASE | {"INVOICE_RELAY_WEB_PASSWORD": "pw"})
    assert caught.value.variable == "INVOICE_RELAY_SECRET_KEY_FILE"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INVOICE_RELAY_WEB_PUBLIC_URL", "relay.example.com"),
        ("INVOICE_RELAY_WEB_TRUSTED_PROXIES", "10.0.0.0/8, proxy.local"),
        ("INVOICE_RELAY_WEB_USER", "two words"),
        ("INVOICE_RELAY_WEB_PORT", "70000"),
    ],
)
def test_malformed_web_settings_name_their_variable(
    key_file: Path, variable: str, value: str
) -> None:
    env = BASE | {
        "INVOICE_RELAY_WEB_PASSWORD": "pw",
        "INVOICE_RELAY_SECRET_KEY_FILE": str(key_file),
        variable: value,
    }
    with pytest.raises((ConfigError, ConfigProblems)) as caught:
        Settings.from_env(env)
    error = caught.value
    named = (
        [error.variable] if isinstance(error, ConfigError) else [p.variable for p in error.problems]
    )
    assert variable in named


def test_a_short_secret_key_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            BASE | {"INVOICE_RELAY_WEB_PASSWORD": "pw", "INVOICE_RELAY_SECRET_KEY_FILE": str(short)}
        )
    assert caught.value.variable == "INVOICE_RELAY_SECRET_KEY_FILE"
