"""The hostile corpus (tests/corpus.py, tests/hostile_pdfs.py) through the real relay,
Dovecot and the SMTP sink.

Every sample goes into the mailbox; `invoice-relay once` runs as a subprocess until no
`error` sighting waits for a retry. Figures (printed with `pytest -s`, quoted in
docs/security.md): samples survived / total, the peak RSS of the relay process and of
its PDF workers (sampled from /proc), and each PDF's check time in a guarded
PdfInspector with the same caps. Nothing is timed as an assertion.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.corpus import Sample, hostile_corpus
from tests.fakes import FakeInspector
from tests.hostile import injected_headers
from tests.integration.test_relay import audit_rows, relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.mail import headers, mime
from worker.models import FolderStatus, MailSummary
from worker.pdf.pool import PdfInspector
from worker.relay.intake import Intake
from worker.relay.mailparts import IntakeRules

# Below the 30 s default so that a hostile PDF that runs out its time costs the corpus
# run 10 s, not 30; the verdict (error, then rejected) does not depend on the length.
PDF_TIMEOUT_SECONDS = 10
PDF_MEMORY_MB = 512
MAX_POLLS = 4  # the first poll, one retry of its errors (ERROR_RETRIES=1), one to give up
NEEDS_REASON = frozenset({"rejected", "error", "duplicate"})
MIB = 1 << 20


@dataclass(slots=True)
class TreePeaks:
    """Peak resident memory (VmHWM, KiB) of a process and of its descendants, by role."""

    relay_kib: int = 0
    helpers_kib: int = 0
    workers_kib: int = 0
    workers_seen: set[int] = field(default_factory=set)


class TreeSampler(threading.Thread):
    """Reads VmHWM of `pid` and every descendant from /proc every few milliseconds.

    VmHWM only grows, so the last reading of each process is its peak (up to the
    readings missed in its last few milliseconds)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks = TreePeaks()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for pid, depth in [(self.pid, 0), *_descendants(self.pid)]:
                status = _status(pid)
                if status is None:
                    continue
                kib = int(status.get("VmHWM", "0 kB").split()[0])
                if depth == 0:
                    self.peaks.relay_kib = max(self.peaks.relay_kib, kib)
                elif depth == 1:  # the forkserver and multiprocessing's resource tracker
                    self.peaks.helpers_kib = max(self.peaks.helpers_kib, kib)
                else:  # forked by the forkserver: the PDF workers
                    self.peaks.workers_kib = max(self.peaks.workers_kib, kib)
                    self.peaks.workers_seen.add(pid)


def _descendants(root: int) -> list[tuple[int, int]]:
    """Every process below `root` with its depth (1 for a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[tuple[int, int]] = []
    pending = [(root, 0)]
    while pending:
        parent, depth = pending.pop()
        below = [(child, depth + 1) for child in children.get(parent, [])]
        found += below
        pending += below
    return found


def _status(pid: int) -> dict[str, str] | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@dataclass(frozen=True, slots=True, kw_only=True)
class Poll:
    returncode: int
    seconds: float
    stderr: str
    peaks: TreePeaks


def run_sampled(env: Mapping[str, str]) -> Poll:
    """`invoice-relay once` as a subprocess, its process tree's memory sampled."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "once"],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        sampler.done.set()
        sampler.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    return Poll(
        returncode=process.returncode,
        seconds=time.monotonic() - started,
        stderr=stderr,
        peaks=sampler.peaks,
    )


def fake_jbig2dec(directory: Path) -> Path:
    """A `jbig2dec` first on PATH that leaves a mark when run: it must never run."""
    marker = directory / "jbig2dec-ran"
    program = directory / "jbig2dec"
    program.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return marker


def check_times(pdfs: Sequence[bytes]) -> list[float]:
    """Seconds each PDF's check takes, one at a time, in a worker with the relay's caps."""
    times: list[float] = []
    with PdfInspector(
        workers=1, timeout_seconds=PDF_TIMEOUT_SECONDS, memory_limit_bytes=PDF_MEMORY_MB * MIB
    ) as inspector:
        inspector.inspect_many([b"%PDF-1.7\n%%EOF\n"])  # start the worker first
        for data in pdfs:
            started = time.monotonic()
            inspector.inspect_many([data])
            times.append(time.monotonic() - started)
    return times


def problems_of(sample: Sample, rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Why `sample` did not survive: [] when each of its rows has a right outcome, and a
    reason where the outcome needs one."""
    if not rows:
        return ["no audit row"]
    problems: list[str] = []
    for row in rows:
        outcome = str(row["outcome"])
        if outcome not in sample.expect:
            problems.append(f"part {row['filename']!r}: {outcome} ({row['reason']})")
        if outcome in NEEDS_REASON and not str(row["reason"] or "").strip():
            problems.append(f"part {row['filename']!r}: {outcome} without a reason")
    return problems


def _attachment(message: EmailMessage) -> bytes:
    (part,) = list(message.iter_attachments())
    assert isinstance(part, EmailMessage)
    data = part.get_content()
    assert isinstance(data, bytes)
    return data


def test_hostile_corpus_through_the_relay(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    corpus = hostile_corpus()
    assert len(corpus) >= 30
    uids = imap.append_many(sample.mail for sample in corpus)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    marker = fake_jbig2dec(tmp_path)
    env = relay_env(
        imap,
        smtp,
        database_url,
        smtp_ca=smtp_ca,
        INVOICE_RELAY_PDF_TIMEOUT=str(PDF_TIMEOUT_SECONDS),
        INVOICE_RELAY_PDF_MEMORY_MB=str(PDF_MEMORY_MB),
        INVOICE_RELAY_ERROR_RETRIES="1",
    )
    env["PATH"] = f"{tmp_path}:{env['PATH']}"

    polls = [run_sampled(env)]
    first_errors = sum(row["outcome"] == "error" for row in audit_rows(database_url))
    while any(row["outcome"] == "error" for row in audit_rows(database_url)):
        assert len(polls) < MAX_POLLS, "error sightings still pending after the retries"
        polls.append(run_sampled(env))
    for poll in polls:
        assert poll.returncode == 0, poll.stderr[-2000:]
    rows = audit_rows(database_url)

    by_uid: dict[int, list[dict[str, object]]] = {}
    for row in rows:
        by_uid.setdefault(int(str(row["uid"])), []).append(row)
    failures = {
        sample.name: problems
        for sample, uid in zip(corpus, uids, strict=True)
        if (problems := problems_of(sample, by_uid.get(uid, [])))
    }

    # Forwarded: only PDFs of samples that may be forwarded, each mail clean.
    allowed = {
        pdf
        for sample in corpus
        if "forwarded" in sample.expect
        for pdf in (sample.pdf, *sample.carried)
    }
    for received in smtp.messages:
        assert _attachment(received.message) in allowed
        assert injected_headers(received.raw) == []
    forwarded = [row for row in rows if row["outcome"] == "forwarded"]
    assert len(smtp.messages) == len(forwarded)
    assert not marker.exists(), "the external JBIG2 decoder ran"

    pdf_samples = [sample for sample in corpus if sample.pdf is not None]
    times = check_times([sample.pdf for sample in pdf_samples if sample.pdf is not None])
    slowest = max(range(len(times)), key=times.__getitem__)
    relay_peak = max(poll.peaks.relay_kib for poll in polls)
    workers_peak = max(poll.peaks.workers_kib for poll in polls)
    outcomes: dict[str, int] = {}
    for row in rows:
        outcomes[str(row["outcome"])] = outcomes.get(str(row["outcome"]), 0) + 1
    figures = [
        ("samples survived / total", f"{len(corpus) - len(failures)} / {len(corpus)}"),
        ("audit rows by outcome", ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))),
        ("errors after poll 1 (retried)", str(first_errors)),
        ("polls (exit status)", ", ".join(f"{p.returncode} in {p.seconds:.1f}s" for p in polls)),
        ("peak RSS, relay process", f"{relay_peak / 1024:.0f} MiB"),
        (
            "peak RSS, PDF workers",
            f"{workers_peak / 1024:.0f} MiB (cap {PDF_MEMORY_MB} MiB address space)",
        ),
        ("slowest PDF check", f"{times[slowest]:.2f}s ({pdf_samples[slowest].name})"),
        ("forwarded mails", str(len(smtp.messages))),
    ]
    width = max(len(name) for name, _ in figures)
    print("\nhostile corpus")
    for name, value in figures:
        print(f"  {name:<{width}}  {value}")

    assert failures == {}
    # The relay never holds a big mail: the 31 MiB and 51 MiB samples are refused unread.
    assert 0 < relay_peak < 300 * 1024
    assert workers_peak < PDF_MEMORY_MB * 1024


# --- what the real Dovecot cannot be made to say ---------------------------------------


class _StructureMailbox:
    """A Mailbox that describes one mail with the given BODYSTRUCTURE and records fetches."""

    def __init__(self, raw_structure: tuple[object, ...]) -> None:
        self.structure = mime.parse_bodystructure(raw_structure)
        self.fetched: list[Mapping[int, Sequence[str]]] = []

    def open(self) -> FolderStatus:
        return FolderStatus(uidvalidity=1, uidnext=8, exists=1)

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        return [7]

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        block = b"From: Shop <invoices@shop.example>\r\nSubject: absurd\r\n\r\n"
        return [
            MailSummary(
                uid=uid,
                size=4096,
                internaldate=datetime(2025, 11, 24, tzinfo=UTC),
                headers=headers.parse_headers(block),
                structure=self.structure,
            )
            for uid in uids
        ]

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        self.fetched.append(wanted)
        return {}

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "size",
    [b"99999999999999999999999999", b"18446744073709551616", 10**30, b"-5", b"12e9999"],
)
def test_an_absurd_bodystructure_size_is_bounded(size: object) -> None:
    """Dovecot computes sizes itself; a hostile or broken server may not. A PDF part
    claiming an absurd size is refused by the size limit and never fetched; a size that
    is no number reads as 0 and the part is fetched (and found empty)."""
    raw = (b"application", b"pdf", (b"name", b"x.pdf"), None, None, b"base64", size)
    mailbox = _StructureMailbox(raw)
    intake = Intake(
        rules=IntakeRules(forward_from="relay@shop.example"),
        mailbox=mailbox,
        inspector=FakeInspector(),
    )
    (record,) = intake.build_records([7])
    (part,) = record.parts
    assert part.reason
    if mailbox.structure.size > 0:
        assert part.kind.value == "rejected"
        assert "INVOICE_RELAY_MAX_PDF_BYTES" in part.reason
        assert mailbox.fetched == []
    else:
        assert part.kind.value == "error"  # the server returned no bytes for it
