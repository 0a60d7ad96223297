"""Secrets never leak: distinctive IMAP, SMTP and PostgreSQL passwords go through real
polls by the CLI (`once`, `check`, `audit`, a refused login, and the `run` service with
its /metrics and /healthz), and none of them appears in any output, log line, error,
audit row or database column."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from tests import samples
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink, free_port, running_sink
from tests.servers.tls import TestCA

SMTP_USER = "relay-sender"
SMTP_PASSWORD = "smtp-Pa55-" + secrets.token_hex(8)
PG_PASSWORD = "pg-Pa55-" + secrets.token_hex(8)  # the test server trusts loopback: any works


@pytest.fixture
def smtp_with_login(smtp_ca: TestCA) -> Iterator[SmtpSink]:
    with running_sink(
        tls_cert=(smtp_ca.cert_file, smtp_ca.key_file), auth=(SMTP_USER, SMTP_PASSWORD)
    ) as sink:
        yield sink


@pytest.fixture
def database_with_password() -> Iterator[str]:
    with temporary_database() as url:
        parts = urlsplit(url)
        netloc = parts.netloc.replace("@", f":{PG_PASSWORD}@", 1)
        yield urlunsplit(parts._replace(netloc=netloc))


def all_database_text(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            texts = []
            for table in sa.inspect(connection).get_table_names():
                rows = connection.execute(sa.text(f'SELECT * FROM "{table}"'))  # noqa: S608
                texts += [repr(tuple(row)) for row in rows]
            texts += [
                repr(tuple(row)) for row in connection.execute(sa.text("SELECT * FROM audit_log"))
            ]
            return "\n".join(texts)
    finally:
        engine.dispose()


def service_output(env: dict[str, str], port: int) -> tuple[str, str]:
    """Start `run`, read /metrics and /healthz after its first poll, stop it by SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        env={**env, "INVOICE_RELAY_HTTP_PORT": str(port), "INVOICE_RELAY_SCHEDULE": "1h"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    scraped = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 'result="ok"' not in scraped:
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                    scraped = page.read().decode()
            except OSError:
                continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as page:
            scraped += page.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert 'result="ok"' in scraped, stderr
    return scraped, stdout + stderr


def test_no_secret_in_output_logs_errors_audit_or_metrics(
    imap: DovecotServer,
    smtp_with_login: SmtpSink,
    smtp_ca: TestCA,
    database_with_password: str,
    tmp_path: Path,
) -> None:
    secrets_used = {
        "IMAP": imap.password,
        "SMTP": SMTP_PASSWORD,
        "PostgreSQL": PG_PASSWORD,
    }
    imap.append_many(
        [
            samples.invoice_mail(pdfs=[("Invoice 1042.pdf", samples.invoice_pdf(number="1042"))]),
            samples.invoice_mail(pdfs=[("corrupt.pdf", samples.corrupt_pdf())]),
            samples.plain_mail(),
            samples.invoice_mail(
                pdfs=[("x.pdf", samples.invoice_pdf(number="9"))], sender="Eve <eve@evil.example>"
            ),
        ]
    )
    env = relay_env(
        imap,
        smtp_with_login,
        database_with_password,
        smtp_ca=smtp_ca,
        INVOICE_RELAY_SMTP_USER=SMTP_USER,
        INVOICE_RELAY_SMTP_PASSWORD=SMTP_PASSWORD,
        INVOICE_RELAY_ALLOWED_SENDERS="@shop.example",
        INVOICE_RELAY_LOG_FORMAT="json",
    )
    outputs: dict[str, str] = {}
    once = run_relay(env, "once")
    assert once.returncode == 0, once.stderr
    assert smtp_with_login.logins == [SMTP_USER]
    assert len(smtp_with_login.messages) == 1
    outputs["once"] = once.stdout + once.stderr
    check = run_relay(env, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    outputs["check"] = check.stdout + check.stderr
    audit = run_relay(env, "audit", "--format", "json")
    assert audit.returncode == 0, audit.stderr
    outputs["audit"] = audit.stdout + audit.stderr
    # Refusals quote what the server said: the password that was refused must not appear.
    refused = run_relay({**env, "INVOICE_RELAY_SMTP_PASSWORD": SMTP_PASSWORD + "-old"}, "check")
    assert refused.returncode == 1
    outputs["refused SMTP login"] = refused.stdout + refused.stderr
    wrong_db = run_relay(
        {
            **env,
            "INVOICE_RELAY_DATABASE_URL": database_with_password.replace("relay_test_", "nope_"),
        },
        "once",
    )
    assert wrong_db.returncode == 1
    outputs["missing database"] = wrong_db.stdout + wrong_db.stderr
    metrics, service_logs = service_output(env, free_port())
    outputs["/metrics and /livez"] = metrics
    outputs["run"] = service_logs
    outputs["database"] = all_database_text(database_with_password)

    log_lines = [line for line in outputs["once"].splitlines() if line.startswith("{")]
    assert log_lines, "the poll wrote no JSON log line"
    for line in log_lines:
        json.loads(line)
    leaks = [
        f"{secret_name} password in {where}"
        for where, text in outputs.items()
        for secret_name, secret in secrets_used.items()
        if secret in text
    ]
    checked = sum(len(text) for text in outputs.values())
    print(
        f"\nsecrets: {len(secrets_used)} passwords, {len(outputs)} outputs, "
        f"{checked} characters checked, {len(log_lines)} JSON log lines of the poll, "
        f"{len(leaks)} leaks"
    )
    assert leaks == []
