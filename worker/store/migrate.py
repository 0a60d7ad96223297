"""Migrations: Alembic, driven from code so an installed relay can migrate itself.

The scripts live in `migrations/` at the repository root and ship in the wheel as
`worker.migrations`. Upgrades on PostgreSQL run under an advisory lock (taken in
`migrations/env.py`), so replicas starting together do not race.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.errors import StoreError
from worker.store.engine import READ_ONLY_OPTION, make_engine, translated

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration's revision. Every start-up compares the database with it by a
# plain query, so a poll of an up-to-date database never imports Alembic (about 0.15 s
# of every cron run); tests/migration checks it against the scripts' real head.
HEAD_REVISION = "0013_notified_sightings"  # the chain: see each down_revision


def migrations_directory() -> Path:
    """The Alembic scripts: shipped inside the package when installed, else the checkout's."""
    package = Path(__file__).resolve().parent.parent  # worker/
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("the migration scripts are missing from this installation")


def _alembic_config(engine: Engine | None = None) -> Config:
    from alembic.config import Config  # only when migrations actually run

    config = Config()
    config.set_main_option("script_location", str(migrations_directory()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The head according to the migration scripts themselves (slow: imports Alembic)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise StoreError("the migration scripts have no head revision")
    return head


# Alembic's `context` is module-global: one migration command at a time per process.
_alembic_lock = threading.Lock()


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`; on PostgreSQL under an advisory lock (env.py)."""
    if revision == "head" and current_revision(url) == HEAD_REVISION:
        return
    _run_alembic(url, revision, downgrade=False)


def downgrade_database(url: str, revision: str = "base") -> None:
    _run_alembic(url, revision, downgrade=True)


def _run_alembic(url: str, revision: str, *, downgrade: bool) -> None:
    from alembic import command

    engine = make_engine(url)
    try:
        with _alembic_lock, translated(engine.url):
            step = command.downgrade if downgrade else command.upgrade
            step(_alembic_config(engine), revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The database's migration revision; None for an empty database."""
    engine = make_engine(url)
    try:
        with translated(engine.url), engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            version = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            return version.scalar_one_or_none()
    finally:
        engine.dispose()


def is_up_to_date(url: str) -> bool:
    return current_revision(url) == HEAD_REVISION
