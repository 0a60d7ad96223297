"""Several routes from one routes file (README, "Several mailboxes: the routes file"):
three Dovecot mailboxes, destinations crossing, replicas, and the move from the
environment to a file. Real Dovecot, the SMTP sink, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.integration.guarantee_tools import Invoice, invoices, relay_command, sql_rows
from tests.integration.test_relay import FORWARD_FROM, relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import ReceivedMail, SmtpSink
from tests.servers.tls import TestCA

INBOX_ONE = "inbox-1@getmyinvoices.example"
INBOX_TWO = "inbox-2@getmyinvoices.example"
USERS = {"shop-a": "a@shop.example", "shop-b": "b@shop.example", "shop-c": "c@shop.example"}


def routes_file(  # noqa: PLR0917 - the servers and the routes, as a test sets them up
    folder: Path,
    imap: DovecotServer,
    smtp: SmtpSink,
    database_url: str,
    ca_bundle: str,
    routes: Mapping[str, tuple[str, str]],  # name -> (imap user, forward_to)
) -> Path:
    """A routes file as a user writes one: shared servers in [defaults], the password
    in a file of its own (relative to the routes file), one table per route."""
    (folder / "imap-password").write_text(imap.password + "\n")
    (folder / "imap-password").chmod(0o600)
    lines = [
        "[relay]",
        f'database_url = "{database_url}"',
        'log_format = "json"',
        "",
        "[defaults]",
        'imap_host = "localhost"',
        f"imap_port = {imap.tls_port}",
        'imap_security = "ssl"',
        'imap_password_file = "imap-password"',
        'smtp_host = "localhost"',
        f"smtp_port = {smtp.port}",
        'smtp_security = "starttls"',
        f'forward_from = "{FORWARD_FROM}"',
        f'ca_file = "{ca_bundle}"',
    ]
    for name, (user, forward_to) in routes.items():
        lines += ["", "[[routes]]", f'name = "{name}"', f'imap_user = "{user}"']
        lines.append(f'forward_to = "{forward_to}"')
    path = folder / "routes.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def sqlite_routes(
    tmp_path: Path,
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    routes: Mapping[str, tuple[str, str]],
) -> tuple[str, Path]:
    """A SQLite database in `tmp_path` and a routes file for it: (its URL, the file)."""
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    bundle = ca_bundle(imap, smtp, smtp_ca, database_url)
    return database_url, routes_file(tmp_path, imap, smtp, database_url, bundle, routes)


def file_env(imap: DovecotServer, smtp: SmtpSink, config: Path) -> dict[str, str]:
    """Nothing but the routes file: every route setting comes from it."""
    del smtp
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(imap.config_file.parent),
        "INVOICE_RELAY_CONFIG": str(config),
    }


def ca_bundle(imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_url: str) -> str:
    return relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)["INVOICE_RELAY_CA_FILE"]


def by_recipient(received: Sequence[ReceivedMail]) -> Counter[tuple[str, str]]:
    """(recipient, PDF SHA-256) -> copies."""
    copies: Counter[tuple[str, str]] = Counter()
    for mail in received:
        sha256 = str(mail.message["X-Invoice-Relay"]).strip()
        for recipient in mail.rcpt_tos:
            copies[(recipient, sha256)] += 1
    return copies


def deliver(imap: DovecotServer, user: str, made: Sequence[Invoice]) -> None:
    imap.append_many([invoice.mail for invoice in made], user=user)


def test_routes_cross_destinations_and_dedupe_per_destination(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {
            "shop-a": (USERS["shop-a"], INBOX_ONE),
            "shop-b": (USERS["shop-b"], INBOX_ONE),  # the same destination as shop-a
            "shop-c": (USERS["shop-c"], INBOX_TWO),
        },
    )
    shared, only_a = invoices(1, first=7000), invoices(1, first=7100)
    deliver(imap, USERS["shop-a"], [*shared, *only_a])
    deliver(imap, USERS["shop-b"], shared)
    deliver(imap, USERS["shop-c"], shared)

    result = run_relay(file_env(imap, smtp, config), "once")

    assert result.returncode == 0, result.stderr
    for name in USERS:
        assert f"route {name}: read " in result.stdout
    copies = by_recipient(smtp.messages)
    # The same PDF bound for two destinations goes to each; two routes feeding one
    # destination share its documents.
    assert copies == {
        (INBOX_ONE, shared[0].sha256): 1,
        (INBOX_ONE, only_a[0].sha256): 1,
        (INBOX_TWO, shared[0].sha256): 1,
    }
    rows = sql_rows(
        database_url,
        "SELECT route, destination, outcome, sha256 FROM audit_log ORDER BY id",
    )
    outcomes = {(row["route"], row["sha256"]): row["outcome"] for row in rows}
    assert outcomes[("shop-b", shared[0].sha256)] == "duplicate"
    assert {outcomes[("shop-a", shared[0].sha256)], outcomes[("shop-c", shared[0].sha256)]} == {
        "forwarded"
    }
    assert {row["destination"] for row in rows if row["route"] == "shop-c"} == {f"smtp:{INBOX_TWO}"}

    audited = run_relay(
        file_env(imap, smtp, config), "audit", "--route", "shop-b", "--format", "json"
    )
    assert audited.returncode == 0, audited.stderr
    assert {row["route"] for row in json.loads(audited.stdout)} == {"shop-b"}


def test_a_failing_route_does_not_stop_the_others(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    _database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {"shop-a": (USERS["shop-a"], INBOX_ONE), "shop-b": (USERS["shop-b"], INBOX_TWO)},
    )
    text = config.read_text().replace(
        'name = "shop-b"', 'name = "shop-b"\nimap_password_file = "wrong-password"'
    )
    config.write_text(text)
    (tmp_path / "wrong-password").write_text("not-the-password\n")
    (tmp_path / "wrong-password").chmod(0o600)
    made = invoices(2, first=7200)
    deliver(imap, USERS["shop-a"], made)
    deliver(imap, USERS["shop-b"], made)

    result = run_relay(file_env(imap, smtp, config), "once")

    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("invoice-relay: ")]
    assert len(failed) == 1 and failed[0].startswith("invoice-relay: route shop-b: "), failed
    assert "route shop-a: read 2 new mail(s)" in result.stdout
    assert by_recipient(smtp.messages) == {(INBOX_ONE, invoice.sha256): 1 for invoice in made}


def test_configuration_errors_name_each_route(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    _database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {"shop-a": (USERS["shop-a"], INBOX_ONE), "shop-b": (USERS["shop-a"], INBOX_TWO)},
    )
    config.write_text(config.read_text() + "imap_prot = 993\n")  # a typo, in shop-b

    result = run_relay(file_env(imap, smtp, config), "once")

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(
        line.startswith("invoice-relay: configuration error: route shop-b: imap_prot")
        for line in lines
    ), lines
    # Two routes on one mailbox folder: reported too, in the same run.
    assert sum("route shop-b" in line for line in lines) >= 2, lines
    assert smtp.messages == []


def test_moving_from_the_environment_to_a_file_forwards_nothing_again(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_FORWARD_TO=INBOX_ONE)
    first = invoices(3, first=7300)
    imap.append_many([invoice.mail for invoice in first])
    assert run_relay(env, "once").returncode == 0
    assert len(smtp.messages) == 3

    # The same mailbox, now a route with a name of its own, beside a new one.
    config = routes_file(
        tmp_path,
        imap,
        smtp,
        database_url,
        env["INVOICE_RELAY_CA_FILE"],
        {"main-shop": (imap.user, INBOX_ONE), "shop-b": (USERS["shop-b"], INBOX_TWO)},
    )
    later = invoices(1, first=7400)
    imap.append_many([invoice.mail for invoice in later])
    result = run_relay(file_env(imap, smtp, config), "once")

    assert result.returncode == 0, result.stderr
    assert "route main-shop: read 1 new mail(s)" in result.stdout  # no rescan
    copies = by_recipient(smtp.messages)
    assert copies == {(INBOX_ONE, invoice.sha256): 1 for invoice in [*first, *later]}
    routes = sql_rows(database_url, "SELECT route FROM audit_log ORDER BY id")
    assert [row["route"] for row in routes] == ["default"] * 3 + ["main-shop"]


def test_two_replicas_of_once_on_postgresql_poll_three_routes(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    with temporary_database() as database_url:
        config = routes_file(
            tmp_path,
            imap,
            smtp,
            database_url,
            ca_bundle(imap, smtp, smtp_ca, database_url),
            {
                "shop-a": (USERS["shop-a"], INBOX_ONE),
                "shop-b": (USERS["shop-b"], INBOX_ONE),
                "shop-c": (USERS["shop-c"], INBOX_TWO),
            },
        )
        env = file_env(imap, smtp, config)
        made = {name: invoices(15, first=8000 + 100 * i) for i, name in enumerate(USERS)}
        made["shop-b"] = made["shop-b"][:5] + made["shop-a"][:5]  # shared with shop-a
        for name, user in USERS.items():
            deliver(imap, user, made[name])

        for _ in range(2):  # two rounds: each replica meets the other's claims and leases
            processes = [
                subprocess.Popen(
                    relay_command("once"),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for process in processes:
                _, stderr = process.communicate(timeout=180)
                assert process.returncode == 0, stderr[-2000:]

        expected: Counter[tuple[str, str]] = Counter()
        for name, route_invoices in made.items():
            inbox = INBOX_TWO if name == "shop-c" else INBOX_ONE
            for invoice in route_invoices:
                expected[(inbox, invoice.sha256)] = 1
        assert by_recipient(smtp.messages) == expected
        states = sql_rows(database_url, "SELECT state, count(*) AS n FROM documents GROUP BY state")
        assert {row["state"]: row["n"] for row in states} == {"forwarded": len(expected)}


@pytest.mark.parametrize("scope", [["--route", "shop-c"], ["--destination", f"smtp:{INBOX_TWO}"]])
def test_resend_names_the_destination_when_a_pdf_went_to_two(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path, scope: list[str]
) -> None:
    _database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {"shop-a": (USERS["shop-a"], INBOX_ONE), "shop-c": (USERS["shop-c"], INBOX_TWO)},
    )
    config.write_text(config.read_text().replace("[defaults]", "[defaults]\nkeep_pdfs = true"))
    shared = invoices(1, first=7500)
    deliver(imap, USERS["shop-a"], shared)
    deliver(imap, USERS["shop-c"], shared)
    env = file_env(imap, smtp, config)
    assert run_relay(env, "once").returncode == 0

    ambiguous = run_relay(env, "resend", shared[0].sha256)
    assert ambiguous.returncode != 0
    assert f"smtp:{INBOX_ONE}" in ambiguous.stderr and f"smtp:{INBOX_TWO}" in ambiguous.stderr

    chosen = run_relay(env, "resend", shared[0].sha256, *scope)
    assert chosen.returncode == 0, chosen.stderr
    assert run_relay(env, "once").returncode == 0
    assert by_recipient(smtp.messages) == {
        (INBOX_ONE, shared[0].sha256): 1,
        (INBOX_TWO, shared[0].sha256): 2,
    }
