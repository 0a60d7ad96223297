"""The promises of docs/guarantees.md, measured: SIGKILLs at random moments during a
backfill, SMTP servers that refuse at random, and a mailbox that people change.

Run `scripts/test tests/integration/test_guarantees.py -s` to see the figures.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from tests.integration.guarantee_tools import (
    await_kill_moment,
    document_states,
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
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA

BACKFILL = 300
KILLS = 10
KILL_SEED = 20261124
# `run`: fewer kills and invoices, each kill costing a lease's wait (30 s), so that the
# test stays within about three minutes.
RUN_BACKFILL = 240
RUN_KILLS = 4
RUN_KILL_SEED = 20261202


def test_sigkill_during_a_backfill_loses_nothing(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    # With the default lease (30 s, renewed by a live owner): no setting shortens it.
    batch = invoices(BACKFILL, first=10_000)
    imap.append_many(invoice.mail for invoice in batch)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    draw = random.Random(KILL_SEED)
    phases: Counter[str] = Counter()
    kills = finished = 0
    waits: list[float] = []
    started = time.monotonic()
    while kills < KILLS:
        # What the killed process held: the next run starts once it expired (without
        # waiting, it would find the mailbox's poll lease taken and do nothing).
        waits.append(wait_for_leases(database_url))
        # Its own process group: the kill takes the PDF workers with it.
        process = subprocess.Popen(
            relay_command("once"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not await_kill_moment(process, smtp, draw):
            finished += 1
            continue
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = time.monotonic()
        kills += 1
        states = Counter(document_states(database_url).values())
        phases["reading mail" if sum(states.values()) < BACKFILL else "sending"] += 1
    # One `once`, started as soon as the last kill's leases expired on the database's
    # clock, finishes everything: the promise is "the first poll a minute later".
    expired = wait_for_leases(database_url)
    expired_after = time.monotonic() - killed_at
    recovery = run_once(env)
    recovered_after = time.monotonic() - killed_at
    assert recovery.returncode == 0, recovery.stderr[-2000:]
    assert "pending" not in document_states(database_url).values()
    seconds = time.monotonic() - started
    figures = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    print(
        f"\nkill test: {BACKFILL} invoices, {kills} SIGKILLs ({dict(phases)}), "
        f"{finished} runs ended on their own, {seconds:.0f}s; leases of a killed run expired "
        f"{max(waits):.1f}s after the kill at most; after the last kill the leases expired "
        f"after {expired_after:.1f}s (waited {expired:.1f}s) and one `once` finished "
        f"everything {recovered_after:.1f}s after the kill\n" + figures.row("after the kills")
    )
    assert expired_after < 60.0  # "the first poll that starts a minute or more later"
    assert figures.lost == 0
    assert figures.stuck == 0
    assert figures.foreign == 0
    assert figures.duplicated <= kills  # each kill can repeat only the mail in flight
    assert figures.duplicates_share_message_id
    (counts,) = sql_rows(
        database_url,
        "SELECT (SELECT count(*) FROM documents) AS documents,"
        " (SELECT count(*) FROM sightings) AS sightings",
    )
    assert counts == {"documents": BACKFILL, "sightings": BACKFILL}


def start_run(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`invoice-relay run` in its own process group (a kill takes the PDF workers too)."""
    return subprocess.Popen(
        relay_command("run"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until_forwarded(database_url: str, count: int, *, timeout: float) -> float:
    """Seconds until `count` documents exist and every one is forwarded."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        states = Counter(document_states(database_url).values())
        if states["forwarded"] == count == sum(states.values()):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not all forwarded within {timeout:.0f} s: {dict(states)}")


def test_sigkill_of_run_during_a_backfill_loses_nothing(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    # The defaults: lease, heartbeat, timeouts and the schedule (*/5 * * * *); only the
    # probes' port is free-chosen. Each restart comes at once, as a container runtime's
    # restart policy does: its start-up poll finds the killed run's poll lease still
    # held and asks again once that lease can have expired (31 s), not at the schedule's
    # next fire (up to 5 minutes later).
    batch = invoices(RUN_BACKFILL, first=20_000)
    imap.append_many(invoice.mail for invoice in batch)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_HTTP_PORT="0")
    draw = random.Random(RUN_KILL_SEED)
    phases: Counter[str] = Counter()
    kills = 0
    started = time.monotonic()
    while kills < RUN_KILLS:
        process = start_run(env)
        try:
            alive = await_kill_moment(process, smtp, draw)
            states = Counter(document_states(database_url).values())
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed_at = time.monotonic()
        assert alive, "`run` ended by itself"
        if states["forwarded"] == RUN_BACKFILL:
            break  # all sent before this kill's moment came: not a kill mid-backfill
        kills += 1
        phases["reading mail" if sum(states.values()) < RUN_BACKFILL else "sending"] += 1
    assert kills >= 3, f"only {kills} kills landed before the backfill was done"
    # The last restart, at once too, left to run until everything is forwarded.
    process = start_run(env)
    restarted = time.monotonic()
    since_kill = restarted - killed_at
    try:
        recovered_after = wait_until_forwarded(database_url, RUN_BACKFILL, timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        stopped_after = time.monotonic() - restarted - recovered_after
    seconds = time.monotonic() - started
    figures = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    print(
        f"\nrun kill test: {RUN_BACKFILL} invoices, {kills} SIGKILLs of `run` "
        f"({dict(phases)}), {seconds:.0f}s, each restarted at once; the last restart, "
        f"{since_kill:.1f}s after the last kill, forwarded everything "
        f"{recovered_after:.1f}s after it started, SIGTERM "
        f"exit {code} after "
        f"{stopped_after:.1f}s\n" + figures.row("after the kills")
    )
    assert code == 0
    assert figures.lost == 0
    assert figures.stuck == 0
    assert figures.foreign == 0
    assert figures.duplicated <= kills
    assert figures.duplicates_share_message_id
    assert "pending" not in document_states(database_url).values()
    (counts,) = sql_rows(
        database_url,
        "SELECT (SELECT count(*) FROM documents) AS documents,"
        " (SELECT count(*) FROM sightings) AS sightings",
    )
    assert counts == {"documents": RUN_BACKFILL, "sightings": RUN_BACKFILL}


def test_smtp_refusals_retry_4xx_once_and_fail_5xx_with_the_answer(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    batch = invoices(36, first=8000)
    refused = invoices(4, first=8900, subject="REFUSE")
    imap.append_many(invoice.mail for invoice in batch + refused)
    smtp.fail_matching(
        lambda message: "REFUSE" in str(message["Subject"]), 550, "5.7.1 content refused"
    )
    smtp.fail_rate(0.1, 421, seed=4, text="4.3.2 closing, try later")
    smtp.fail_rate(0.2, 451, seed=5, text="4.3.0 try again later")
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    # A short retry delay (default 60 s) only lets the retries of 451 answers come within
    # the test; the lease, which this test is about, keeps its default.
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_RETRY_DELAY="0.05s")
    runs = run_until_done(env, database_url, max_runs=20, pause=0.2)
    refusals = Counter(code for _, code in smtp.refusals)
    accepted = [m for m in smtp.messages if "REFUSE" not in str(m.message["Subject"])]
    figures = tally([invoice.sha256 for invoice in batch], accepted, database_url)
    print(
        f"\nSMTP errors: {len(batch)} invoices answered 421/451 at random "
        f"({refusals[421]} x 421, {refusals[451]} x 451), {len(refused)} answered 550 "
        f"({refusals[550]} x 550); {len(runs)} runs\n" + figures.row("4xx, eventually")
    )
    assert refusals[421] + refusals[451] > 0
    assert (figures.lost, figures.duplicated, figures.stuck) == (0, 0, 0)
    assert refusals[550] == len(refused)  # a permanent answer is never retried
    failed = sql_rows(
        database_url, "SELECT subject, reason, attempts FROM audit_log WHERE outcome = 'failed'"
    )
    assert sorted(str(row["subject"]) for row in failed) == sorted(
        f"REFUSE {invoice.number}" for invoice in refused
    )
    for row in failed:
        assert "550" in str(row["reason"]) and "5.7.1" in str(row["reason"])
        assert row["attempts"] == 1


def test_uidvalidity_change_and_deleted_mail_forward_nothing_twice(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    first, later, extra = invoices(3, first=9100), invoices(2, first=9200), invoices(1, first=9300)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    imap.append_many(invoice.mail for invoice in first)
    assert run_once(env).returncode == 0
    assert len(smtp.messages) == 3

    # A new UIDVALIDITY (the folder deleted and re-created): the same mails come back
    # under new UIDs, plus one that is new.
    old_uidvalidity = imap.uidvalidity()
    imap.recreate_folder()
    imap.append_many(invoice.mail for invoice in [*first, *later])
    rescan = run_once(env)
    assert rescan.returncode == 0, rescan.stderr[-2000:]
    assert len(smtp.messages) == 5

    # Deleted by a person between polls: one mail never seen, one seen and then gone.
    uids = imap.append_many(invoice.mail for invoice in extra)
    imap.delete_uids(uids)
    assert run_once(env).returncode == 0
    imap.delete_uids(range(1, 4))
    assert run_once(env).returncode == 0

    # An emptied mailbox: nothing to do, nothing breaks, the position holds.
    imap.recreate_folder()
    emptied = run_once(env)
    assert emptied.returncode == 0, emptied.stderr[-2000:]
    imap.append_many(invoice.mail for invoice in later)
    assert run_once(env).returncode == 0

    figures = tally([i.sha256 for i in [*first, *later]], smtp.messages, database_url)
    print("\nUIDVALIDITY and mailbox changes:\n" + figures.row("after five changes"))
    assert (figures.lost, figures.duplicated, figures.stuck, figures.foreign) == (0, 0, 0, 0)
    rows = sql_rows(database_url, "SELECT uidvalidity, outcome FROM audit_log")
    after = Counter(str(row["outcome"]) for row in rows if row["uidvalidity"] != old_uidvalidity)
    assert after == Counter(duplicate=5, forwarded=2)
