"""What the guarantee tests share: many distinct invoice mails, running the relay until
it is done, and the tally of lost, duplicated and stuck PDFs against what was sent."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from tests import samples
from tests.documents import wait_for_leases_to_expire
from tests.servers.smtp_sink import ReceivedMail, SmtpSink
from worker.store.sqlstore import SqlStore


@dataclass(frozen=True, slots=True, kw_only=True)
class Invoice:
    number: str
    pdf: bytes
    mail: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.pdf).hexdigest()


def invoices(count: int, *, first: int = 5000, subject: str = "Invoice") -> list[Invoice]:
    """`count` distinct invoices (one PDF template, different numbers), one mail each."""
    made = []
    for number in range(first, first + count):
        pdf = samples.invoice_pdf(number=str(number), amount=f"{number % 997}.00", logo=False)
        mail = samples.invoice_mail(
            pdfs=[(f"Invoice {number}.pdf", pdf)],
            subject=f"{subject} {number}",
            message_id=f"<invoice-{number}@shop.example>",
        )
        made.append(Invoice(number=str(number), pdf=pdf, mail=mail))
    return made


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    """Forwarded mail counted against the invoices that should have gone out once each."""

    expected: int
    lost: int  # expected, never received
    duplicated: int  # received more than once (each extra copy counts)
    stuck: int  # documents not `forwarded` once the relay says it is done
    foreign: int  # received, never expected
    duplicates_share_message_id: bool  # every repeated mail kept its Message-ID

    def row(self, label: str) -> str:
        return (
            f"{label:<24} expected {self.expected:>4}  lost {self.lost}  "
            f"duplicated {self.duplicated}  stuck {self.stuck}"
        )


def tally(expected: Sequence[str], received: Sequence[ReceivedMail], database_url: str) -> Tally:
    """`expected`: SHA-256 of each PDF; `received`: what the sink accepted."""
    by_hash: Counter[str] = Counter()
    message_ids: dict[str, set[str]] = {}
    for mail in received:
        sha256 = str(mail.message["X-Invoice-Relay"]).strip()  # folded: 64 characters
        by_hash[sha256] += 1
        message_ids.setdefault(sha256, set()).add(str(mail.message["Message-ID"]))
    wanted = set(expected)
    states = document_states(database_url)
    return Tally(
        expected=len(wanted),
        lost=len(wanted - set(by_hash)),
        duplicated=sum(count - 1 for count in by_hash.values() if count > 1),
        stuck=sum(1 for sha256 in wanted if states.get(sha256) != "forwarded"),
        foreign=len(set(by_hash) - wanted),
        duplicates_share_message_id=all(len(ids) == 1 for ids in message_ids.values()),
    )


def _engine(database_url: str) -> sa.Engine:
    return sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))


def document_states(database_url: str) -> dict[str, str]:
    """sha256 -> state of every document (empty before the schema exists)."""
    engine = _engine(database_url)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("documents"):
                return {}
            rows = connection.execute(sa.text("SELECT sha256, state FROM documents"))
            return {str(sha256): str(state) for sha256, state in rows}
    finally:
        engine.dispose()


def sql_rows(database_url: str, query: str) -> list[dict[str, object]]:
    engine = _engine(database_url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(sa.text(query))]
    finally:
        engine.dispose()


def relay_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def run_once(env: Mapping[str, str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        relay_command("once"),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_leases(database_url: str) -> float:
    """Block until every lease held now has expired on the database's clock (a process
    that died holding them hands nothing back); returns the seconds waited. With the
    default lease: at most 30 s after the owner's last renewal."""
    store = SqlStore(database_url)
    try:
        if not sa.inspect(store.engine).has_table("poll_leases"):
            return 0.0
        return wait_for_leases_to_expire(store)
    finally:
        store.close()


def run_until_done(
    env: Mapping[str, str], database_url: str, *, max_runs: int = 10, pause: float = 0.3
) -> list[subprocess.CompletedProcess[str]]:
    """Run `once` until a run succeeds with nothing left pending. Before each run, the
    leases of a process that crashed must expire, with the default lease, as they must
    for a user; a process that ended by itself handed them back already."""
    runs = []
    for _ in range(max_runs):
        wait_for_leases(database_url)
        result = run_once(env)
        runs.append(result)
        if result.returncode == 0 and "pending" not in document_states(database_url).values():
            return runs
        time.sleep(pause)  # a retry delay (INVOICE_RELAY_RETRY_DELAY) to come due
    raise AssertionError(f"not done after {max_runs} runs; last stderr: {runs[-1].stderr[-2000:]}")


def await_kill_moment(
    process: subprocess.Popen[bytes], sink: SmtpSink, draw: random.Random
) -> bool:
    """Wait for a random moment to kill `process`: mostly right after the sink accepted
    one of the next 1..40 mails (the sending phase, and the window after acceptance);
    sometimes a random time after start-up (reading mail, or start-up itself). False
    when the process ended by itself first."""
    by_time = draw.random() < 0.3
    deadline = time.monotonic() + (draw.uniform(0.3, 3.0) if by_time else 60.0)
    target = sink.received_count() + draw.randint(1, 40)
    while process.poll() is None and time.monotonic() < deadline and sink.received_count() < target:
        time.sleep(0.002)
    return process.poll() is None
