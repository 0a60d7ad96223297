"""Database URLs in messages never show a password, wherever the URL carries it; each
SQLite connection gets WAL, the busy timeout and foreign keys, even on a file another
connection is writing when it opens; one reading of SQLite URLs."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from worker.errors import StoreError
from worker.models import DATABASE_WAIT_SECONDS, sqlite_file, sqlite_location
from worker.store.engine import describe, make_engine, parse_url, translate


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://relay:Sekr3t@db/relay", "postgresql+psycopg://relay:****@db/relay"),
        ("postgresql://relay:p%40ss@db/relay", "postgresql+psycopg://relay:****@db/relay"),
        (
            "postgresql://relay@db/relay?password=Sekr3t&sslmode=require",
            "postgresql+psycopg://relay@db/relay?password=****&sslmode=require",
        ),
        (
            "postgresql://relay@db/relay?PASSWORD=Sekr3t",
            "postgresql+psycopg://relay@db/relay?PASSWORD=****",
        ),
        ("sqlite:////data/invoice-relay.db", "sqlite:////data/invoice-relay.db"),
    ],
)
def test_describe_masks_every_password(url: str, shown: str) -> None:
    assert describe(parse_url(url)) == shown


def test_translated_errors_mask_query_passwords() -> None:
    from sqlalchemy.exc import OperationalError

    url = parse_url("postgresql://relay@db/relay?password=Sekr3t")
    error = translate(OperationalError("connect", {}, Exception("password Sekr3t refused")), url)
    assert isinstance(error, StoreError)
    assert "Sekr3t" not in str(error)
    assert "****" in str(error)


def test_a_sqlite_connection_opens_while_another_holds_the_write_lock(tmp_path: Path) -> None:
    # A fresh file still in rollback-journal mode, with a writer holding its RESERVED
    # lock: switching to WAL is refused at once ("database is locked", no busy wait),
    # so the connection must try again until the writer is done.
    path = tmp_path / "relay.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    done = threading.Timer(0.3, writer.execute, args=("COMMIT",))
    done.start()
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            settings = [
                connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            ]
    finally:
        engine.dispose()
        done.join()
        writer.close()
    assert settings == ["wal", int(DATABASE_WAIT_SECONDS * 1000), 1]


@pytest.mark.parametrize(
    ("url", "location", "path"),
    [
        ("sqlite:////data/relay.db", "/data/relay.db", Path("/data/relay.db")),
        ("sqlite+pysqlite:////data/relay.db?timeout=5", "/data/relay.db", Path("/data/relay.db")),
        ("sqlite:///relative.db", "relative.db", Path("relative.db")),
        ("sqlite:///~/relay.db", "~/relay.db", Path("~/relay.db").expanduser()),
        ("sqlite:///file:relay.db?mode=ro&uri=true", "file:relay.db", None),
        ("sqlite://", "", None),
        ("sqlite:///:memory:", ":memory:", None),
        ("postgresql+psycopg://relay@db/relay", None, None),
        ("not a url", None, None),
    ],
)
def test_one_reading_of_sqlite_urls_agrees_with_sqlalchemy(
    url: str, location: str | None, path: Path | None
) -> None:
    # Settings check the path and the store creates its folder from this one reading.
    assert sqlite_location(url) == location
    assert sqlite_file(url) == path
    if location is not None:
        assert (make_url(url).database or "") == location
