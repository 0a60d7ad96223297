"""SqlStore's connections, poll lock and errors, against SQLite and PostgreSQL (`integration`)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.storecases import (
    MAILBOX,
    StoreFactory,
)
from worker.errors import StoreError
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


# --- connections, locks, errors --------------------------------------------------------


def test_poll_lock_is_exclusive_across_stores(store_factory: StoreFactory) -> None:
    # A lease row on both databases now (it was a session advisory lock on PostgreSQL
    # and no lock at all on SQLite).
    first, second = store_factory(), store_factory()
    with first.poll_lock(MAILBOX, owner="first", lease_seconds=30) as held:
        assert held
        with second.poll_lock(MAILBOX, owner="second", lease_seconds=30) as contended:
            assert not contended
        with second.poll_lock(
            "other@example.test/INBOX", owner="second", lease_seconds=30
        ) as other:
            assert other
    with second.poll_lock(MAILBOX, owner="second", lease_seconds=30) as afterwards:
        assert afterwards


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("postgres://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("postgresql+psycopg://relay@127.0.0.1/relay", "postgresql+psycopg"),
        ("sqlite:///relay.db", "sqlite"),
    ],
)
def test_urls_are_normalised_to_psycopg(url: str, driver: str) -> None:
    store = SqlStore(url)
    try:
        assert store.engine.url.drivername == driver
    finally:
        store.close()


@pytest.mark.parametrize("url", ["not a url", "mysql://relay@127.0.0.1/relay"])
def test_unusable_urls_raise_store_error(url: str) -> None:
    with pytest.raises(StoreError):
        SqlStore(url)


def test_an_unreachable_database_raises_store_error_without_the_password() -> None:
    from tests.servers.postgres import _free_port

    store = SqlStore(f"postgresql://relay:hunter2secret@127.0.0.1:{_free_port()}/relay")
    try:
        with pytest.raises(StoreError) as caught:
            store.position(MAILBOX)
    finally:
        store.close()
    assert "hunter2secret" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
