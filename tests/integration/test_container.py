"""The image's recipe without a Docker engine: build the wheel from exactly what the
Dockerfile copies, install it into a fresh virtualenv the way the final stage does
(`pip install` of the wheel, its dependencies from the package index), then run the
entrypoint against the test servers from a directory outside the checkout.

The virtualenv is built once per session (about 15 s, mostly the dependencies).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import samples
from tests.integration.test_relay import FORWARD_TO, relay_env
from tests.integration.test_service_run import free_port
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.unit.test_dockerfile import DOCKERFILE, parse_dockerfile
from worker.store import migrate

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class Installed:
    venv: Path
    workdir: Path  # the container's WORKDIR stand-in: not the checkout

    @property
    def entrypoint(self) -> Path:
        return self.venv / "bin" / "invoice-relay"

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{base.get('PATH', '')}"
        env.pop("PYTHONPATH", None)
        return env

    def run(self, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.entrypoint), *args],
            env=self.env(env),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _builder_sources() -> list[str]:
    """What the Dockerfile's builder stage COPYs into /src."""
    builder = parse_dockerfile(DOCKERFILE.read_text())[0]
    return [
        source.rstrip("/")
        for item in builder
        if item.keyword == "COPY" and not item.arguments.startswith("--from")
        for source in item.arguments.split()[:-1]
    ]


def _pip(*args: str, python: Path | str = sys.executable) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        timeout=600,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("image")
    source = base / "src"
    source.mkdir()
    for name in _builder_sources():
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(
                origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]")
            )
        else:
            shutil.copy2(origin, source / name)
    wheels = base / "wheels"
    # The builder stage: `pip wheel --no-deps --wheel-dir /wheels .`
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), str(source))
    (wheel,) = wheels.glob("*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The final stage: `pip install --no-cache-dir /wheels/*.whl`
    _pip("install", "--no-cache-dir", str(wheel), python=venv / "bin" / "python")
    workdir = base / "data"
    workdir.mkdir()
    return Installed(venv=venv, workdir=workdir)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import worker; print(worker.__file__)"],
        env=installed.env({"PATH": os.environ.get("PATH", "")}),
        cwd=installed.workdir,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)


def test_version(installed: Installed) -> None:
    result = installed.run({"PATH": os.environ.get("PATH", "")}, "--version")
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"invoice-relay {expected}"


def test_check_and_once_from_the_installed_wheel(
    installed: Installed, imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'data' / 'invoice-relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    check = installed.run(env, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("ok ") == 3

    imap.append(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", samples.invoice_pdf())]))
    once = installed.run(env, "once")
    assert once.returncode == 0, once.stderr
    (mail,) = smtp.messages
    assert mail.rcpt_tos == (FORWARD_TO,)
    # The migrations came inside the wheel: the new database is at the checkout's head.
    assert migrate.current_revision(database_url) == migrate.head_revision()
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            outcomes = connection.execute(sa.text("SELECT outcome FROM audit_log")).scalars()
            assert list(outcomes) == ["forwarded"]
    finally:
        engine.dispose()


def test_healthcheck_against_the_installed_service(
    installed: Installed, imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    port = free_port()
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_HTTP_PORT=str(port),
        INVOICE_RELAY_SCHEDULE="0 0 1 1 *",
    )
    probe_env = {"PATH": env["PATH"], "INVOICE_RELAY_HTTP_PORT": str(port)}
    assert installed.run(probe_env, "healthcheck").returncode == 1  # nothing runs yet

    log_file = tmp_path / "run.log"
    with log_file.open("wb") as log:
        service = subprocess.Popen(
            [str(installed.entrypoint), "run"],
            env=installed.env(env),
            cwd=installed.workdir,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            ready = installed.run(probe_env, "healthcheck", "--ready")
            if ready.returncode == 0:
                break
            assert service.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, ready.stdout + log_file.read_text()
            time.sleep(0.2)
        live = installed.run(probe_env, "healthcheck")
        assert (live.returncode, live.stdout.strip()) == (0, "ok")
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
