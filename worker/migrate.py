"""Migrations: Alembic, driven from code so an installed relay can migrate itself.

The scripts live in `migrations/` at the repository root and ship in the wheel as
`worker.migrations`. Upgrades on PostgreSQL run under an advisory lock (taken in
`migrations/env.py`), so replicas starting together do not race.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from worker.db import READ_ONLY_OPTION, make_engine, translated
from worker.errors import StoreError


def migrations_directory() -> Path:
    """The Alembic scripts: shipped inside the package when installed, else the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("the migration scripts are missing from this installation")


def _alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_directory()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise StoreError("the migration scripts have no head revision")
    return head


# Alembic's `context` is module-global: one migration command at a time per process.
_alembic_lock = threading.Lock()


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`; on PostgreSQL under an advisory lock (env.py)."""
    engine = make_engine(url)
    try:
        with _alembic_lock, translated(engine.url):
            command.upgrade(_alembic_config(engine), revision)
    finally:
        engine.dispose()


def downgrade_database(url: str, revision: str = "base") -> None:
    engine = make_engine(url)
    try:
        with _alembic_lock, translated(engine.url):
            command.downgrade(_alembic_config(engine), revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The database's migration revision; None for an empty database."""
    engine = make_engine(url)
    try:
        with translated(engine.url), engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def is_up_to_date(url: str) -> bool:
    return current_revision(url) == head_revision()
