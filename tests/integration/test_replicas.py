"""Several relays on one database and one mailbox: each PDF forwarded once.

PostgreSQL: processes started together; one holds the mailbox's poll lease, the others
exit 0 and say so; sends are claimed with FOR UPDATE SKIP LOCKED. SQLite (one host):
two processes on one file start at the same time (both migrate it, both ask for the
poll lease) and never fail with "database is locked" (WAL, busy_timeout, BEGIN
IMMEDIATE).
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from tests.documents import OWNER, QUEUE_MAILBOX, add_pending_documents
from tests.integration.guarantee_tools import invoices, relay_command, tally
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.models import DocumentState
from worker.store import migrate
from worker.store.sqlstore import SqlStore

LOCKED_LINE = "another replica is polling this mailbox"


def start_together(env: dict[str, str], count: int) -> list[subprocess.CompletedProcess[str]]:
    processes = [
        subprocess.Popen(
            relay_command("once"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def test_three_replicas_on_postgresql_forward_each_pdf_once(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA
) -> None:
    rounds, per_round, replicas = 3, 60, 3
    sent: list[str] = []
    locked = 0
    with temporary_database() as database_url:
        migrate.upgrade_database(database_url)  # as the image's start-up does, once
        env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
        for round_number in range(rounds):
            batch = invoices(per_round, first=20_000 + 1000 * round_number)
            imap.append_many(invoice.mail for invoice in batch)
            sent.extend(invoice.sha256 for invoice in batch)
            for result in start_together(env, replicas):
                assert result.returncode == 0, result.stderr[-2000:]
                assert "Traceback" not in result.stderr
                locked += LOCKED_LINE in result.stdout
        figures = tally(sent, smtp.messages, database_url)
    print(
        f"\nreplicas: {replicas} processes x {rounds} rounds on one PostgreSQL database, "
        f"{len(sent)} invoices; {locked} runs found the poll lock held and exited 0\n"
        + figures.row("PostgreSQL replicas")
    )
    assert (figures.lost, figures.duplicated, figures.stuck, figures.foreign) == (0, 0, 0, 0)


def test_two_processes_on_one_sqlite_file(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    batch = invoices(80, first=30_000)
    imap.append_many(invoice.mail for invoice in batch)
    # A fresh file: both processes also migrate it at once.
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    results = start_together(env, 2)
    for result in results:
        assert "database is locked" not in result.stderr
        assert result.returncode == 0, result.stderr[-2000:]
    figures = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    print("\n" + figures.row("2 processes, one SQLite"))
    assert (figures.lost, figures.duplicated, figures.stuck, figures.foreign) == (0, 0, 0, 0)


def test_concurrent_claims_never_lease_a_document_twice(database_url: str) -> None:
    """Four senders claim from one queue at once: every document is claimed once."""
    migrate.upgrade_database(database_url)
    store = SqlStore(database_url)
    now = datetime.now(UTC)
    count, senders = 120, 4
    add_pending_documents(store, count, now=now)
    claims: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(senders)

    def sender() -> None:
        start.wait()
        while claimed := store.claim_due(
            mailbox=QUEUE_MAILBOX, owner=OWNER, now=datetime.now(UTC), limit=3, lease_seconds=600
        ):
            with lock:
                claims.update(document.document_id for document in claimed)
            for document in claimed:
                store.mark_forwarded(
                    document.document_id,
                    owner=OWNER,
                    message_id=f"<{document.sha256}@test>",
                    answer="250 OK",
                    now=datetime.now(UTC),
                    keep_pdf=False,
                )

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert len(claims) == count
        assert max(claims.values()) == 1
        assert store.state_counts()[DocumentState.FORWARDED] == count
    finally:
        store.close()
