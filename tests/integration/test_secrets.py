"""Secrets never leak: distinctive IMAP, SMTP and PostgreSQL passwords go through real
polls by the CLI (`once`, `check`, `audit`, a refused login, and the `run` service with
its /metrics and /healthz), and none of them appears in any output, log line, error,
audit row or database column. The same for OAuth2: every access and refresh token the
token server handed out, the client secret and the key they are sealed with, through
`once`, `check`, `oauth status`, `run` and a revoked grant, and not one byte of a token
in the database file."""

from __future__ import annotations

import base64
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
from tests.integration.test_oauth_relay import (
    MAILBOX,
    TENANT,
    invoice,
    oauth_env,
)
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink, free_port, running_sink
from tests.servers.tls import TestCA
from tests.servers.token_server import TokenServer
from worker.mail.sasl import oauthbearer, xoauth2

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


OAUTH_CLIENT_SECRET = "oauth-Cl1ent-" + secrets.token_hex(8)


def test_no_token_or_secret_in_output_logs_database_or_metrics(
    introspecting_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    # The delegated flow of a confidential client: a client secret, and a refresh token
    # rotated on every use, so there are several of each kind of token to look for.
    token_server.add_client("web-1", secret=OAUTH_CLIENT_SECRET, mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="web-1")
    introspecting_imap.deliver(invoice("1042"))
    env = oauth_env(
        introspecting_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        INVOICE_RELAY_OAUTH_PROVIDER="microsoft",
        INVOICE_RELAY_OAUTH_FLOW="delegated",
        INVOICE_RELAY_OAUTH_TENANT=TENANT,
        INVOICE_RELAY_OAUTH_CLIENT_ID="web-1",
        INVOICE_RELAY_OAUTH_CLIENT_SECRET=OAUTH_CLIENT_SECRET,
        INVOICE_RELAY_OAUTH_REFRESH_TOKEN=configured,
        INVOICE_RELAY_OAUTH_AUTHORITY=token_server.url,
        INVOICE_RELAY_LOG_FORMAT="json",
    )
    outputs: dict[str, str] = {}
    once = run_relay(env, "once")
    assert once.returncode == 0, once.stderr
    assert len(oauth_smtp.messages) == 1
    outputs["once"] = once.stdout + once.stderr
    # Refused as expired: the retry with a fresh token, and a rotation.
    token_server.expire_access_tokens()
    introspecting_imap.deliver(invoice("1043"))
    again = run_relay(env, "once")
    assert again.returncode == 0, again.stderr
    outputs["once, token refused"] = again.stdout + again.stderr
    for command in (("check",), ("oauth", "status"), ("audit", "--format", "json")):
        result = run_relay(env, *command)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[" ".join(command)] = result.stdout + result.stderr
    metrics, service_logs = service_output(env, free_port())
    outputs["/metrics and /livez"] = metrics
    outputs["run"] = service_logs
    token_server.expire_access_tokens()
    token_server.revoke_all()
    revoked = run_relay(env, "once")
    assert revoked.returncode == 1
    outputs["revoked grant"] = revoked.stdout + revoked.stderr
    wrong_secret = run_relay(
        {**env, "INVOICE_RELAY_OAUTH_CLIENT_SECRET": "x" + OAUTH_CLIENT_SECRET}, "check"
    )
    assert wrong_secret.returncode == 1
    outputs["wrong client secret"] = wrong_secret.stdout + wrong_secret.stderr
    outputs["database rows"] = all_database_text(env["INVOICE_RELAY_DATABASE_URL"])

    tokens = token_server.handed_out()
    # The configured refresh token, and an access and a refresh token of each refresh.
    assert len(tokens) == 5
    # What a token looks like on the wire too, should a debug log show the SASL lines.
    on_the_wire = {
        base64.b64encode(message(user=MAILBOX, token=token)).decode()
        for token in tokens
        if not token.startswith("rt-")
        for message in (xoauth2, oauthbearer)
    }
    key_file = Path(env["INVOICE_RELAY_SECRET_KEY_FILE"])
    secrets_used = {
        **{f"token {token[:6]}...": token for token in tokens},
        **{f"SASL response {wire[:6]}...": wire for wire in on_the_wire},
        "client secret": OAUTH_CLIENT_SECRET,
        "secret key": key_file.read_text().strip(),
    }
    leaks = [
        f"{name} in {where}"
        for where, text in outputs.items()
        for name, secret in secrets_used.items()
        if secret in text
    ]
    # The database file itself, with its journal: a token is stored sealed, never as bytes.
    database_files = sorted(tmp_path.glob("relay.db*"))
    engine = sa.create_engine(env["INVOICE_RELAY_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            stored = connection.execute(sa.text("SELECT COUNT(*) FROM oauth_tokens")).scalar()
    finally:
        engine.dispose()
    assert stored == 1  # the tokens are there, sealed: the search below has something to find
    for path in database_files:
        data = path.read_bytes()
        leaks += [
            f"{name} in {path.name}"
            for name, secret in secrets_used.items()
            if secret.encode() in data
        ]
    print(
        f"\noauth secrets: {len(secrets_used)} values ({len(tokens)} tokens), {len(outputs)} "
        f"outputs and {len(database_files)} database files checked, {len(leaks)} leaks"
    )
    assert leaks == []
