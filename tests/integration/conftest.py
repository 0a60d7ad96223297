"""Real servers for the integration tests: Dovecot, an aiosmtpd sink, SQLite and
PostgreSQL. Each listens on loopback on a free port and is stopped after its test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.dovecot import DovecotServer, running_dovecot
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.tls import TestCA, make_ca
from tests.servers.token_server import TokenServer, running_token_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[DovecotServer]:
    with running_dovecot(tmp_path / "dovecot") as server:
        yield server


@pytest.fixture
def smtp_ca(tmp_path: Path) -> TestCA:
    return make_ca(tmp_path / "smtp-tls")


@pytest.fixture
def smtp(smtp_ca: TestCA) -> Iterator[SmtpSink]:
    with running_sink(tls_cert=(smtp_ca.cert_file, smtp_ca.key_file)) as sink:
        yield sink


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'relay.db'}"
    else:
        with temporary_database() as url:
            yield url


# --- OAuth2: a token server, and Dovecot and an SMTP sink that take only its tokens ---


@pytest.fixture
def token_server(tmp_path: Path, smtp_ca: TestCA) -> Iterator[TokenServer]:
    # One test CA for the token server and the SMTP sink: relay_env's bundle trusts it.
    with running_token_server(tmp_path / "tokens", tls=smtp_ca) as server:
        yield server


@pytest.fixture
def oauth_imap(tmp_path: Path, token_server: TokenServer) -> Iterator[DovecotServer]:
    """Dovecot validating each token locally, as a signed JWT (Exchange Online and Gmail
    ask nobody either): expiry, issuer and audience come from the token itself."""
    with running_dovecot(tmp_path / "dovecot", oauth2=token_server.dovecot_passdb()) as server:
        yield server


@pytest.fixture
def introspecting_imap(tmp_path: Path, token_server: TokenServer) -> Iterator[DovecotServer]:
    """Dovecot asking the token server about each token (RFC 7662): it sees a token made
    invalid early (`TokenServer.expire_access_tokens`), and which token each login used."""
    passdb = token_server.dovecot_passdb(local=False)
    with running_dovecot(tmp_path / "dovecot", oauth2=passdb) as server:
        yield server


@pytest.fixture
def oauth_smtp(token_server: TokenServer, smtp_ca: TestCA) -> Iterator[SmtpSink]:
    def valid(user: str, token: str) -> bool:
        issued = token_server.issued(token)
        return token_server.is_valid(token) and issued is not None and issued.user == user

    with running_sink(tls_cert=(smtp_ca.cert_file, smtp_ca.key_file), oauth2=valid) as sink:
        yield sink
