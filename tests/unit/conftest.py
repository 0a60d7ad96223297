"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.postgres import postgres_server, temporary_database
from tests.storecases import StoreFactory
from worker.store.engine import create_schema, make_engine
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    """A real store on a fresh SQLite file (embedded: it needs no server)."""
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(store.engine)
    yield store
    store.close()


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores (own engines) on one fresh database with the current schema: a SQLite
    file, and a throw-away PostgreSQL database (`integration`). For the test_store_* files."""
    if request.param == "sqlite":
        context = None
        url = f"sqlite:///{tmp_path / 'relay.db'}"
    else:
        base_url = request.getfixturevalue("postgres_base_url")
        context = temporary_database(base_url)
        url = context.__enter__()
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    opened: list[SqlStore] = []

    def open_store() -> SqlStore:
        opened.append(SqlStore(url))
        return opened[-1]

    try:
        yield open_store
    finally:
        for each in opened:
            each.close()
        if context is not None:
            context.__exit__(None, None, None)
