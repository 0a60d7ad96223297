"""Deduplication policy: a re-rendered copy is a duplicate only with INVOICE_RELAY_DEDUP=
content; a corrected invoice (same number, other amount) is forwarded either way; a PDF
without a fingerprint is keyed by its bytes hash and still forwarded.

First the pipeline with in-memory IMAP and SMTP fakes, the real PDF check and a real
store on SQLite and PostgreSQL; then `invoice-relay once` against Dovecot and the sink.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.models import AuditFilter, AuditRow, DedupMode, Outcome
from worker.pdf.inspection import inspect_pdf
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.store import migrate
from worker.store.sqlstore import SqlStore

FORWARD_TO = "inbox-4711@getmyinvoices.example"
FORWARD_FROM = "relay@shop.example"

ORIGINAL = samples.invoice_pdf(number="1042", amount="99.00")
# Printout Designer fired again: same pages, new creation date and producer.
RERENDER = samples.invoice_pdf(
    number="1042",
    amount="99.00",
    created=datetime(2024, 5, 9, 14, 2, tzinfo=UTC),
    producer="Printout Designer (automation rule 2)",
)
# The shop fixed the total and sent the invoice again under its number.
CORRECTED = samples.invoice_pdf(number="1042", amount="98.00")

BYTES_ONLY = "deduplicated by SHA-256 only"


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    migrate.upgrade_database(database_url)
    store = SqlStore(database_url)
    yield store
    store.close()


def poll(
    store: SqlStore,
    mails: list[bytes],
    *,
    dedup: DedupMode,
    inspector: FakeInspector | None = None,
) -> tuple[list[AuditRow], FakeOutbox]:
    mailbox, outbox = FakeMailbox(), FakeOutbox()
    for mail in mails:
        mailbox.add(mail)
    pipeline = Pipeline(
        config=PipelineConfig(
            mailbox="invoices@imap.example/INBOX",
            forward_to=FORWARD_TO,
            forward_from=FORWARD_FROM,
            dedup=dedup,
        ),
        mailbox=mailbox,
        outbox=outbox,
        store=store,
        owner=poll_owner(store, "invoices@imap.example/INBOX"),
        inspector=inspector or FakeInspector(check=inspect_pdf),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        rng=random.Random(4),
    )
    pipeline.poll()
    return sorted(store.audit(AuditFilter()), key=lambda row: row.id), outbox


def mail(pdf: bytes, tag: str) -> bytes:
    return samples.invoice_mail(
        pdfs=[("Invoice 1042.pdf", pdf)], message_id=f"<{tag}@shop.example>"
    )


def attachments(outbox: FakeOutbox) -> list[bytes]:
    found = []
    for message in outbox.sent:
        (attachment,) = list(message.iter_attachments())
        found.append(attachment.get_content())
    return found


def test_bytes_mode_forwards_the_re_render(store: SqlStore) -> None:
    rows, outbox = poll(
        store,
        [mail(ORIGINAL, "a"), mail(RERENDER, "b"), mail(CORRECTED, "c")],
        dedup=DedupMode.BYTES,
    )
    assert [row.outcome for row in rows] == [Outcome.FORWARDED] * 3
    assert attachments(outbox) == [ORIGINAL, RERENDER, CORRECTED]
    assert rows[0].fingerprint == rows[1].fingerprint != rows[2].fingerprint
    assert [row.invoice_number for row in rows] == ["1042"] * 3


def test_content_mode_skips_the_re_render_and_forwards_the_correction(store: SqlStore) -> None:
    resaved = samples.resaved_with_pypdf(ORIGINAL)
    rows, outbox = poll(
        store,
        [mail(ORIGINAL, "a"), mail(RERENDER, "b"), mail(CORRECTED, "c"), mail(resaved, "d")],
        dedup=DedupMode.CONTENT,
    )
    assert [row.outcome for row in rows] == [
        Outcome.FORWARDED,
        Outcome.DUPLICATE,
        Outcome.FORWARDED,
        Outcome.DUPLICATE,
    ]
    assert attachments(outbox) == [ORIGINAL, CORRECTED]
    original = rows[0]
    for duplicate in (rows[1], rows[3]):
        assert duplicate.reason == f"same content fingerprint as sighting {original.id}"
        assert duplicate.duplicate_of == original.id
        assert duplicate.fingerprint == original.fingerprint
        assert duplicate.sha256 != original.sha256
        assert duplicate.forwarded_at is None
    assert rows[2].duplicate_of is None
    # The accountant's question "did 1042 go through?" finds every sighting of it.
    by_number = store.audit(AuditFilter(invoice_number="1042"))
    assert sorted(row.id for row in by_number) == [row.id for row in rows]


def test_identical_bytes_name_sha256_even_in_content_mode(store: SqlStore) -> None:
    rows, _ = poll(store, [mail(ORIGINAL, "a"), mail(ORIGINAL, "b")], dedup=DedupMode.CONTENT)
    assert rows[1].outcome is Outcome.DUPLICATE
    assert rows[1].reason == f"same sha256 as sighting {rows[0].id}"


def test_without_fingerprint_the_bytes_hash_decides(store: SqlStore) -> None:
    # A fingerprint that runs out of time, as a slow file does in the worker pool.
    slow = FakeInspector(check=functools.partial(inspect_pdf, fingerprint_budget_seconds=0))
    locked = samples.encrypted_pdf()
    rows, outbox = poll(
        store,
        [
            mail(ORIGINAL, "a"),
            mail(RERENDER, "b"),
            mail(ORIGINAL, "c"),
            mail(locked, "d"),
            mail(locked, "e"),
        ],
        dedup=DedupMode.CONTENT,
        inspector=slow,
    )
    assert [row.outcome for row in rows] == [
        Outcome.FORWARDED,
        Outcome.FORWARDED,  # same pages, but without fingerprints nothing says so
        Outcome.DUPLICATE,
        Outcome.FORWARDED,
        Outcome.DUPLICATE,
    ]
    assert attachments(outbox) == [ORIGINAL, RERENDER, locked]
    assert all(row.fingerprint is None for row in rows)
    assert (
        rows[0].reason == f"no content fingerprint (took longer than its time budget): {BYTES_ONLY}"
    )
    assert rows[3].reason == f"no content fingerprint (encrypted with a password): {BYTES_ONLY}"
    assert rows[2].reason == f"same sha256 as sighting {rows[0].id}"
    assert rows[4].duplicate_of == rows[3].id


# --- end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("dedup", ["bytes", "content"])
def test_once_applies_the_dedup_policy(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    dedup: str,
) -> None:
    uids = {
        "original": imap.append(mail(ORIGINAL, "a")),
        "rerender": imap.append(mail(RERENDER, "b")),
        "corrected": imap.append(mail(CORRECTED, "c")),
    }
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_DEDUP=dedup)

    result = run_relay(env, "once")
    assert result.returncode == 0, result.stderr

    sent = [next(m.message.iter_attachments()).get_content() for m in smtp.messages]
    audit = run_relay(env, "audit", "--invoice", "1042", "--format", "json")
    assert audit.returncode == 0, audit.stderr
    rows = {int(row["uid"]): row for row in json.loads(audit.stdout)}
    assert sorted(rows) == sorted(uids.values())
    original, rerender = rows[uids["original"]], rows[uids["rerender"]]
    corrected = rows[uids["corrected"]]
    assert original["outcome"] == corrected["outcome"] == "forwarded"
    assert original["fingerprint"] == rerender["fingerprint"] != corrected["fingerprint"]
    if dedup == "bytes":
        assert sorted(sent) == sorted([ORIGINAL, RERENDER, CORRECTED])
        assert rerender["outcome"] == "forwarded"
    else:
        assert sorted(sent) == sorted([ORIGINAL, CORRECTED])
        assert rerender["outcome"] == "duplicate"
        assert rerender["reason"] == f"same content fingerprint as sighting {original['id']}"
        assert rerender["duplicate_of"] == original["id"]
