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
