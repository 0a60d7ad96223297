"""Alembic environment for invoice-relay.

Programmatic runs (`worker.store.migrate.upgrade_database`) hand in their engine through
`config.attributes["engine"]`; the `alembic` command line takes the URL from
`-x url=...` (see alembic.ini). On PostgreSQL the upgrade runs under a session-level
advisory lock so that replicas starting together apply each migration once.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.store.engine import MIGRATION_LOCK_KEY, make_engine
from worker.store.schema import metadata

config = context.config

# Only the `alembic` command line configures logging; the service has its own.
if config.config_file_name is not None and "engine" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give the database URL: alembic -x url=postgresql://... upgrade head")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite can roll back DDL too once BEGIN is ours (see worker.store.engine.make_engine).
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_locked(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        _run(connection)
    finally:
        try:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
        except SQLAlchemyError:
            # A dead session holds no lock; make sure it is not pooled either.
            connection.invalidate()


def run_migrations_online() -> None:
    given = config.attributes.get("engine")
    engine: Engine = given if isinstance(given, Engine) else make_engine(_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                _run_locked(connection)
            else:
                _run(connection)
    finally:
        if engine is not given:
            engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
