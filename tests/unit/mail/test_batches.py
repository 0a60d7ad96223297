"""Bounded batches: a poll's batches are cut by RFC822.SIZE as well as by count, so a
backfill of large mails is never held in memory, or written in one transaction, at once."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox
from worker.mail.batches import size_batches
from worker.models import (
    AuditFilter,
    DedupMode,
    MailRecord,
    MailSummary,
    Outcome,
    RecordedSighting,
)
from worker.relay.intake import Intake
from worker.relay.mailparts import IntakeRules
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore

MAILBOX = "invoices@imap.example/INBOX"


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "max_count", "expected"),
    [
        ([], 10, None, []),
        ([3, 3, 3], 10, None, [3]),
        ([4, 4, 4], 10, None, [2, 1]),
        ([5, 5, 5, 5], 10, None, [2, 2]),  # exactly at the bound fits
        ([8] * 200, 20, 200, [2] * 100),  # 200 mails of 8 MB are not one batch
        ([1] * 5, 100, 2, [2, 2, 1]),  # the count still cuts
        ([25, 1, 1], 10, None, [1, 2]),  # a mail over the bound is a batch of its own
        ([1, 25, 1], 10, None, [1, 1, 1]),
        ([0, 0, 0], 1, None, [3]),  # nothing to hold (a mail too large to be read)
        ([-1, 5], 5, None, [2]),  # a nonsense size counts as nothing
        ([10], 10, 1, [1]),
    ],
)
def test_size_batches(
    sizes: list[int], max_bytes: int, max_count: int | None, expected: list[int]
) -> None:
    assert size_batches(sizes, max_bytes=max_bytes, max_count=max_count) == expected
    assert sum(expected) == len(sizes)


@pytest.mark.parametrize(("max_bytes", "max_count"), [(0, None), (10, 0)])
def test_size_batches_refuses_empty_bounds(max_bytes: int, max_count: int | None) -> None:
    with pytest.raises(ValueError, match="positive"):
        size_batches([1], max_bytes=max_bytes, max_count=max_count)


# --- a poll against fakes ----------------------------------------------------------------


class MeasuringStore(SqlStore):
    """A real store that notes which mails each transaction recorded."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.transactions: list[list[int]] = []

    def record_mails(
        self, *, mails: Sequence[MailRecord], **kwargs: object
    ) -> list[RecordedSighting]:
        self.transactions.append([mail.uid for mail in mails])
        return super().record_mails(mails=mails, **kwargs)  # type: ignore[arg-type]


class MeasuringMailbox(FakeMailbox):
    """Notes the UIDs whose PDF parts each FETCH asked for, and whose summaries."""

    def __init__(self) -> None:
        super().__init__()
        self.part_fetches: list[list[int]] = []
        self.summarised: list[int] = []

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        self.summarised.extend(uids)
        return super().summaries(uids)

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        if max_bytes is None:
            self.part_fetches.append(sorted(wanted))
        return super().fetch_sections(wanted, max_bytes=max_bytes)


def big_invoice_mail(index: int, size: int) -> bytes:
    noise = random.Random(index).randbytes(size)
    pdf = b"%PDF-1.4\n" + noise + b"\n%%EOF\n"
    return samples.invoice_mail(pdfs=[(f"Invoice {index}.pdf", pdf)], subject=f"Invoice {index}")


@pytest.mark.parametrize("batch_size", [200, 5], ids=["one poll batch", "a backfill"])
def test_a_batch_never_holds_more_than_its_byte_bound(tmp_path: Path, batch_size: int) -> None:
    store = MeasuringStore(f"sqlite:///{tmp_path}/relay.db")
    create_schema(store.engine)
    mailbox = MeasuringMailbox()
    uids = [mailbox.add(big_invoice_mail(index, 60_000)) for index in range(12)]
    sizes = {uid: len(mailbox.mails[uid].raw) for uid in uids}
    bound = 3 * max(sizes.values())  # three mails a batch
    outbox = FakeOutbox()
    try:
        Pipeline(
            config=PipelineConfig(
                mailbox=MAILBOX,
                forward_to="inbox@getmyinvoices.example",
                forward_from="relay@shop.example",
                dedup=DedupMode.BYTES,
                batch_size=batch_size,
                batch_bytes=bound,
            ),
            mailbox=mailbox,
            outbox=outbox,
            store=store,
            owner=poll_owner(store, MAILBOX),
            inspector=FakeInspector(),
            clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
            rng=random.Random(1),
            stop=threading.Event(),
        ).poll()
        for batch in [*store.transactions, *mailbox.part_fetches]:
            assert sum(sizes[uid] for uid in batch) <= bound
        # Every mail recorded exactly once, in order, and forwarded; no summary asked twice.
        assert [uid for batch in store.transactions for uid in batch] == uids
        assert len(store.transactions) >= 4
        assert sorted(mailbox.summarised) == uids
        rows = store.audit(AuditFilter())
        assert sorted(row.uid for row in rows if row.outcome is Outcome.FORWARDED) == uids
        assert len(outbox.sent) == len(uids)
        position = store.position(MAILBOX)
        assert position is not None and position.last_uid == uids[-1]
    finally:
        store.close()


def test_a_cut_batch_covers_the_vanished_uids_before_its_cut_and_hands_on_the_rest() -> None:
    mailbox = MeasuringMailbox()
    uids = [mailbox.add(big_invoice_mail(index, 10_000)) for index in range(6)]
    size = max(len(mail.raw) for mail in mailbox.mails.values())
    for gone in (uids[1], uids[4]):
        del mailbox.mails[gone]
    intake = Intake(
        rules=IntakeRules(forward_from="relay@shop.example", batch_bytes=2 * size),
        mailbox=mailbox,
        inspector=FakeInspector(),
    )
    first = intake.fetch(uids)
    # Two mails fit: uids[0] and uids[2]; uids[1] vanished between them.
    assert first.uids == (uids[0], uids[1], uids[2])
    assert first.vanished == (uids[1],)
    assert first.rest == (uids[3], uids[4], uids[5])
    assert [summary.uid for summary in first.rest_summaries] == [uids[3], uids[5]]
    second = intake.fetch(first.rest, described=first.rest_summaries)
    assert (second.uids, second.vanished, second.rest) == (first.rest, (uids[4],), ())
    assert mailbox.summarised == uids  # the rest's summaries were not asked for again
