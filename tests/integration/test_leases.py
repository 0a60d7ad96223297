"""Leases with live owners, measured with the defaults a user has (a 30 s lease renewed
every 10 s; the default INVOICE_RELAY_TIMEOUT of 60 s): a sender frozen at the `354`
answer past its lease, SIGTERM while a server stalls, and a replica whose database
connection is black-holed.

Run `scripts/test tests/integration/test_leases.py -s` to see the figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.guarantee_tools import (
    invoices,
    relay_command,
    run_once,
    run_until_done,
    sql_rows,
    tally,
    wait_for_leases,
)
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink
from tests.servers.stall_proxy import Fault, StallProxy, running_proxy
from tests.servers.tls import TestCA
from worker.relay.lease import LEASE_SECONDS

STOP_PROMISE = 10.0  # seconds from SIGTERM to exit (docs/guarantees.md)
WAIT = 120.0


@pytest.fixture
def smtp_proxy(smtp: SmtpSink) -> Iterator[StallProxy]:
    with running_proxy(smtp.port) as proxy:
        yield proxy


def plain_env(
    imap: DovecotServer, smtp: SmtpSink, database_url: str, smtp_ca: TestCA, *, smtp_port: int
) -> dict[str, str]:
    """The relay's defaults, except plain SMTP (a proxy finds a fault by its bytes)."""
    return relay_env(
        imap,
        smtp,
        database_url,
        smtp_ca=smtp_ca,
        INVOICE_RELAY_SMTP_HOST="127.0.0.1",
        INVOICE_RELAY_SMTP_PORT=str(smtp_port),
        INVOICE_RELAY_SMTP_SECURITY="none",
    )


def started(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            relay_command(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its PDF workers are stopped and resumed with it
        )


def test_a_sender_frozen_at_354_past_its_lease_sends_no_second_copy(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    smtp_proxy: StallProxy,
    tmp_path: Path,
) -> None:
    (invoice,) = invoices(1, first=7700)
    imap.append(invoice.mail)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    frozen_env = plain_env(imap, smtp, database_url, smtp_ca, smtp_port=smtp_proxy.port)
    # The server's `354` answer is held: the sender waits for it, then is frozen there.
    smtp_proxy.add_fault(Fault(direction="to_client", action="hold", after_pattern=b"354"))
    frozen = started("once", frozen_env, tmp_path / "frozen.log")
    try:
        assert smtp_proxy.tripped.wait(WAIT), "the sender never reached DATA"
        os.killpg(frozen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Past its lease on the database's clock (the frozen heartbeat renews nothing),
        # another process takes the mailbox and the document over and forwards it.
        waited = wait_for_leases(database_url)
        took_over = run_once(plain_env(imap, smtp, database_url, smtp_ca, smtp_port=smtp.port))
        assert took_over.returncode == 0, took_over.stderr[-2000:]
        taken_over_after = time.monotonic() - stopped_at
        assert len(smtp.messages) == 1
        # The stale owner wakes up: the `354` reaches it, it sends the content, and
        # before ending the mail it finds the claim is no longer its own.
        smtp_proxy.release()
        os.killpg(frozen.pid, signal.SIGCONT)
        assert frozen.wait(WAIT) == 0
    finally:
        if frozen.poll() is None:
            os.killpg(frozen.pid, signal.SIGKILL)
            frozen.wait()
    log = (tmp_path / "frozen.log").read_text(errors="replace")
    print(
        f"\nfrozen at 354: taken over {taken_over_after:.1f}s after the freeze "
        f"(the lease expired {waited:.1f}s into it); copies at the sink: {len(smtp.messages)}"
    )
    assert "lease_lost" in log, log[-3000:]
    assert "before its content was ended" in log, log[-3000:]  # the check before the dot
    assert len(smtp.messages) == 1  # exactly one copy, the one the new owner sent
    (document,) = sql_rows(
        database_url, "SELECT state, attempts, lease_owner, lease_until FROM documents"
    )
    # The stale owner's writes changed nothing: one attempt (the new owner's), no lease.
    assert document == {
        "state": "forwarded",
        "attempts": 1,
        "lease_owner": None,
        "lease_until": None,
    }
    figures = tally([invoice.sha256], smtp.messages, database_url)
    assert (figures.lost, figures.duplicated, figures.stuck) == (0, 0, 0)


@pytest.mark.parametrize("command", ["once", "run"])
def test_sigterm_during_a_backfill_against_a_stalling_server_exits_within_10_s(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    *,
    smtp_proxy: StallProxy,
    tmp_path: Path,
    command: str,
) -> None:
    batch = invoices(250, first=7800)  # more than a fetch batch: a backfill, sent while read
    imap.append_many(invoice.mail for invoice in batch)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = plain_env(imap, smtp, database_url, smtp_ca, smtp_port=smtp_proxy.port)
    env["INVOICE_RELAY_SCHEDULE"] = "0 0 1 1 *"  # `run`: the start-up poll only
    env["INVOICE_RELAY_HTTP_PORT"] = "0"
    # The first mail's content stops halfway: the server never answers, and the relay
    # would wait its whole default timeout (60 s) for the answer.
    smtp_proxy.add_fault(
        Fault(direction="to_server", action="stall", after_pattern=b"data\r\n", after_bytes=3000)
    )
    process = started(command, env, tmp_path / f"{command}.log")
    try:
        assert smtp_proxy.tripped.wait(WAIT), "the relay never sent"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(STOP_PROMISE * 3)
        exited_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = (tmp_path / f"{command}.log").read_text(errors="replace")
    # What it held was handed back on the way out: the next process need not wait.
    held = sql_rows(
        database_url,
        "SELECT (SELECT count(*) FROM documents WHERE lease_owner IS NOT NULL) AS documents,"
        " (SELECT count(*) FROM poll_leases) AS polls",
    )
    recorded = len(sql_rows(database_url, "SELECT id FROM documents"))
    print(
        f"\nSIGTERM during a backfill, {command}: exited {status} after {exited_after:.1f}s "
        f"({recorded} of {len(batch)} recorded, {len(smtp.messages)} sent by then)"
    )
    assert exited_after < STOP_PROMISE, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert held == [{"documents": 0, "polls": 0}]
    # Nothing lost: the next runs (a healthy server now) forward every invoice once.
    smtp_proxy.clear_faults()
    assert wait_for_leases(database_url) == pytest.approx(0.0, abs=1.0)
    run_until_done(plain_env(imap, smtp, database_url, smtp_ca, smtp_port=smtp.port), database_url)
    figures = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    print(figures.row("after the SIGTERM"))
    assert (figures.lost, figures.stuck, figures.foreign) == (0, 0, 0)
    assert figures.duplicated <= 1  # the mail whose content was cut, had it arrived
    assert figures.duplicates_share_message_id


def test_a_replica_cut_off_from_its_database_is_taken_over_within_lease_and_interval(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    *,
    smtp_proxy: StallProxy,
    tmp_path: Path,
) -> None:
    # Replica A reaches PostgreSQL through a proxy that then black-holes its connections
    # (no FIN, no answer: its session, and a session lock, would linger for hours);
    # replica B, a `run` on a one-minute schedule, takes its mailbox and documents over.
    batch = invoices(12, first=7900)
    imap.append_many(invoice.mail for invoice in batch)
    interval = 60.0
    with temporary_database() as database_url:
        host_port = database_url.rsplit("@", 1)[1].split("/", 1)[0]
        database_port = int(host_port.rsplit(":", 1)[1])
        with running_proxy(database_port) as database_proxy:
            cut_off_url = database_url.replace(f":{database_port}/", f":{database_proxy.port}/")
            env_a = plain_env(imap, smtp, cut_off_url, smtp_ca, smtp_port=smtp_proxy.port)
            # A is mid-send, holding the poll lease and a claim, when it is cut off.
            smtp_proxy.add_fault(Fault(direction="to_client", action="hold", after_pattern=b"354"))
            replica_a = started("once", env_a, tmp_path / "a.log")
            replica_b: subprocess.Popen[bytes] | None = None
            try:
                assert smtp_proxy.tripped.wait(WAIT), "replica A never reached DATA"
                database_proxy.black_hole()
                cut_at = time.monotonic()
                smtp_proxy.release()  # A goes on: its next database call never returns
                env_b = plain_env(imap, smtp, database_url, smtp_ca, smtp_port=smtp.port)
                env_b["INVOICE_RELAY_SCHEDULE"] = f"{interval:.0f}s"
                env_b["INVOICE_RELAY_HTTP_PORT"] = "0"
                replica_b = started("run", env_b, tmp_path / "b.log")
                deadline = cut_at + LEASE_SECONDS + interval + 30.0  # + the work itself
                while len(smtp.messages) < len(batch) and time.monotonic() < deadline:
                    assert replica_b.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
                    time.sleep(0.2)
                taken_over_after = time.monotonic() - cut_at
                assert replica_a.poll() is None  # still hanging on its database: not dead
            finally:
                for process in (replica_a, replica_b):
                    if process is not None and process.poll() is None:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
        figures = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    print(
        f"\nlost node: replica A's database black-holed mid-send; replica B (every "
        f"{interval:.0f}s) sent all {len(batch)} {taken_over_after:.1f}s later "
        f"(bound: lease {LEASE_SECONDS:.0f}s + one interval)\n" + figures.row("after the takeover")
    )
    assert taken_over_after <= LEASE_SECONDS + interval + 30.0, (tmp_path / "b.log").read_text(
        errors="replace"
    )[-3000:]
    assert (figures.lost, figures.stuck, figures.foreign) == (0, 0, 0)
    assert figures.duplicated == 0  # A could not end its mail without its database
