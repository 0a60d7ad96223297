"""`invoice-relay check` against Dovecot, the SMTP sink and SQLite: one line per check, a
clear line for each fault, never a password."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration.test_relay import FORWARD_TO, relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA

CHECKS = ("imap", "smtp", "database")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def lines_by_check(stdout: str) -> dict[str, str]:
    """{check name: its whole line}; fails when a check has no line or two."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().partition(":")[0]
        assert status in ("ok", "FAIL"), line
        assert name not in found, f"two lines for {name}"
        found[name] = line
    return found


def test_check_passes_on_a_good_setup(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}", smtp_ca=smtp_ca)
    result = run_relay(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = lines_by_check(result.stdout)
    assert sorted(lines) == sorted(CHECKS)
    assert all(line.startswith("ok ") for line in lines.values()), result.stdout
    assert "INBOX" in lines["imap"]
    assert smtp.messages == []  # check sends nothing unless asked
    assert imap.password not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("fault", "failing", "words"),
    [
        ("wrong_imap_password", "imap", ("login", "INVOICE_RELAY_IMAP_PASSWORD")),
        ("imap_port_closed", "imap", ("INVOICE_RELAY_IMAP_PORT",)),
        ("missing_folder", "imap", ("Rechnungen", "INVOICE_RELAY_IMAP_FOLDER")),
        ("smtp_port_closed", "smtp", ("INVOICE_RELAY_SMTP_PORT",)),
    ],
)
def test_check_names_each_fault_on_one_line(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    *,
    fault: str,
    failing: str,
    words: tuple[str, ...],
) -> None:
    wrong_password = "Wr0ng-Pa55word-xyzzy"
    overrides = {
        "wrong_imap_password": {"INVOICE_RELAY_IMAP_PASSWORD": wrong_password},
        "imap_port_closed": {"INVOICE_RELAY_IMAP_PORT": str(free_port())},
        "missing_folder": {"INVOICE_RELAY_IMAP_FOLDER": "Rechnungen"},
        "smtp_port_closed": {"INVOICE_RELAY_SMTP_PORT": str(free_port())},
    }[fault]
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_TIMEOUT="5",
        **overrides,
    )
    result = run_relay(env, "check")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = lines_by_check(result.stdout)
    assert sorted(lines) == sorted(CHECKS)
    failed = {name for name, line in lines.items() if line.startswith("FAIL")}
    assert failed == {failing}, result.stdout
    for word in words:
        assert word.lower() in lines[failing].lower(), lines[failing]
    assert "Traceback" not in output
    assert imap.password not in output
    assert wrong_password not in output


def test_send_test_delivers_one_mail_to_the_named_address_only(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    address = "me@shop.example"
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}", smtp_ca=smtp_ca)
    result = run_relay(env, "check", "--send-test", address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "send-test" in lines_by_check(result.stdout)
    (mail,) = smtp.messages
    assert mail.rcpt_tos == (address,)
    assert FORWARD_TO not in mail.rcpt_tos
    assert mail.message["To"] == address
    assert list(mail.message.iter_attachments()) == []


@pytest.mark.parametrize("command", ["check", "once"])
def test_a_missing_required_variable_exits_2_naming_it(tmp_path: Path, command: str) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "INVOICE_RELAY_IMAP_HOST": "127.0.0.1",
        "INVOICE_RELAY_IMAP_PASSWORD": "secret-not-shown",
        "INVOICE_RELAY_SMTP_HOST": "127.0.0.1",
        "INVOICE_RELAY_FORWARD_TO": FORWARD_TO,
        "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
    }
    result = run_relay(env, command)
    assert result.returncode == 2
    assert "INVOICE_RELAY_IMAP_USER" in result.stderr
    assert "secret-not-shown" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".local").exists()  # nothing was created
