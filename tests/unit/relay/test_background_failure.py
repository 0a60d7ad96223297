"""A backfill sends in a thread of its own while the poll reads on: when both the
sending and the reading fail, each failure is seen once, the sending one with its
traceback, and the reading one is what the poll raises."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox, FakeStore
from worker.errors import MailboxError
from worker.models import DedupMode, MailSummary
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig


class _SecondReadFails(FakeMailbox):
    """Reads the first batch of a backfill, then loses the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        self.reads += 1
        if self.reads == 2:
            raise MailboxError("connection lost", host="fake", port=143)
        return super().summaries(uids)


class _BrokenOutbox(FakeOutbox):
    def open(self) -> None:
        raise RuntimeError("a bug in the sending path")


def test_a_sending_failure_is_logged_when_reading_fails_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailbox = _SecondReadFails()
    for number in range(5):
        pdf = samples.invoice_pdf(number=f"B-{number}")
        mailbox.add(samples.invoice_mail(pdfs=[(f"B-{number}.pdf", pdf)]))
    store = FakeStore()
    pipeline = Pipeline(
        config=PipelineConfig(
            mailbox="invoices@imap.example/INBOX",
            forward_to="inbox@getmyinvoices.example",
            forward_from="relay@shop.example",
            dedup=DedupMode.BYTES,
            batch_size=2,  # five new mails: a backfill, sent while read
        ),
        mailbox=mailbox,
        outbox=_BrokenOutbox(),
        store=store,
        owner=poll_owner(store, "invoices@imap.example/INBOX"),
        inspector=FakeInspector(),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        rng=random.Random(4),
        stop=threading.Event(),
    )

    with caplog.at_level(logging.ERROR), pytest.raises(MailboxError, match="connection lost"):
        pipeline.poll()

    (record,) = [r for r in caplog.records if getattr(r, "action", "") == "forwarding_failed"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "a bug in the sending path" in record.getMessage()
