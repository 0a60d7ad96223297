"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    """A real store on a fresh SQLite file (embedded: it needs no server)."""
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(store.engine)
    yield store
    store.close()
