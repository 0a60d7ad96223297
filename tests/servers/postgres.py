"""Throw-away PostgreSQL databases for tests.

`temporary_database` creates a uniquely named database on the server at `base_url`
and drops it afterwards, first ending any session a test left behind. When nothing
answers at `base_url`, `postgres_server` can start a private server on a free
loopback port (as the `postgres` user: PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

DEFAULT_BASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


def _libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq URI (drops the `+driver`)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def answers(base_url: str = DEFAULT_BASE_URL) -> bool:
    try:
        with psycopg.connect(_libpq_url(base_url), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def temporary_database(base_url: str = DEFAULT_BASE_URL) -> Iterator[str]:
    """Yield the SQLAlchemy URL of a new, empty database; drop it afterwards."""
    name = f"relay_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_libpq_url(base_url), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(base_url, name)
    finally:
        with psycopg.connect(_libpq_url(base_url), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _binaries() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries (initdb) found")
    return candidates[-1].parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a base URL: the usual server when it answers, else a private one we start."""
    if answers(DEFAULT_BASE_URL):
        yield DEFAULT_BASE_URL
        return
    with private_server() as url:
        yield url


@contextmanager
def private_server() -> Iterator[str]:
    """Start a PostgreSQL server of our own on a free loopback port; stop it afterwards."""
    binaries = _binaries()
    port = _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="relay-pg-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        if as_postgres:
            shutil.chown(tmp, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(
            [*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", "root", "--auth=trust"],
            check=True,
            capture_output=True,
        )
        options = f"-h 127.0.0.1 -p {port} -k {tmp} -c fsync=off"
        subprocess.run(
            [
                *as_postgres,
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(Path(tmp) / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        url = f"postgresql+psycopg://root@127.0.0.1:{port}/postgres"
        try:
            deadline = time.monotonic() + 30
            while not answers(url):
                if time.monotonic() > deadline:
                    raise RuntimeError("the private PostgreSQL server did not start")
                time.sleep(0.2)
            yield url
        finally:
            subprocess.run(
                [
                    *as_postgres,
                    str(binaries / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                check=False,
                capture_output=True,
            )
