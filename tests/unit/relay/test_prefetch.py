"""A poll fetches the next batch over IMAP while this one's PDFs are checked and
recorded; the mailbox position still never passes a mail that is not recorded."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox, FakeStore
from worker.errors import MailboxError
from worker.models import (
    DedupMode,
    FolderStatus,
    MailRecord,
    MailSummary,
    PdfReport,
    RecordedSighting,
)
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig

MAILBOX = "invoices@imap.example/INBOX"
WAIT = 5.0  # seconds a test waits for the other thread before it gives up


class WatchedMailbox(FakeMailbox):
    """Fails the test's assertion when two threads use it at once; can fail the n-th
    `summaries` call; announces each `summaries` call."""

    def __init__(self) -> None:
        super().__init__()
        self._in_use = threading.Lock()
        self.overlapped = False
        self.summaries_called = threading.Semaphore(0)
        self.fail_summaries_call: int | None = None
        self._summaries_calls = 0

    def _guarded(self) -> _Use:
        return _Use(self)

    def open(self) -> FolderStatus:
        with self._guarded():
            return super().open()

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        with self._guarded():
            return super().new_uids(after_uid, since)

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        with self._guarded():
            self._summaries_calls += 1
            self.summaries_called.release()
            if self._summaries_calls == self.fail_summaries_call:
                raise MailboxError("connection lost", host="fake", port=143)
            return super().summaries(uids)

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        with self._guarded():
            return super().fetch_sections(wanted, max_bytes=max_bytes)


class _Use:
    def __init__(self, mailbox: WatchedMailbox) -> None:
        self._mailbox = mailbox

    def __enter__(self) -> None:
        if not self._mailbox._in_use.acquire(blocking=False):
            self._mailbox.overlapped = True
            self._mailbox._in_use.acquire()

    def __exit__(self, *_: object) -> None:
        self._mailbox._in_use.release()


class OverlapInspector(FakeInspector):
    """Checks a batch only once the next batch's fetch has begun (when there is one)."""

    def __init__(self, mailbox: WatchedMailbox, batches: int) -> None:
        super().__init__()
        self.mailbox = mailbox
        self.batches = batches
        self.checked_batches = 0
        self.waited_for_next: list[bool] = []
        self.prestarted = 0

    def prestart(self) -> None:
        self.prestarted += 1

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        self.checked_batches += 1
        if self.checked_batches < self.batches:
            # summaries of batch N+1 is called while batch N is being checked
            self.waited_for_next.append(self.mailbox.summaries_called.acquire(timeout=WAIT))
        return super().inspect_many(files)


class CheckedStore(FakeStore):
    """After each recorded batch: every UID up to the position is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded_uids: set[int] = set()
        self.positions: list[int] = []

    def record_mails(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        mails: Sequence[MailRecord],
        advance_to: int | None,
        dedup: DedupMode,
        keep_pdfs: bool,
        now: datetime,
        owner: str,
        destination: str,
        route: str = "default",
    ) -> list[RecordedSighting]:
        result = super().record_mails(
            destination=destination,
            route=route,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            mails=mails,
            advance_to=advance_to,
            dedup=dedup,
            keep_pdfs=keep_pdfs,
            now=now,
            owner=owner,
        )
        self.recorded_uids.update(mail.uid for mail in mails)
        position = self.position(MAILBOX)
        if position is not None:
            self.positions.append(position.last_uid)
        return result


@pytest.fixture
def store() -> CheckedStore:
    return CheckedStore()


def pipeline(mailbox: WatchedMailbox, inspector: FakeInspector, store: FakeStore) -> Pipeline:
    return Pipeline(
        config=PipelineConfig(
            mailbox=MAILBOX,
            forward_to="inbox-123@getmyinvoices.example",
            forward_from="relay@shop.example",
            dedup=DedupMode.BYTES,
            batch_size=4,
        ),
        mailbox=mailbox,
        outbox=FakeOutbox(),
        store=store,
        owner=poll_owner(store, MAILBOX),
        inspector=inspector,
        rng=random.Random(4),
    )


def fill(mailbox: FakeMailbox, count: int) -> None:
    for index in range(count):
        pdf = b"%%PDF-1.4\ninvoice %d\n%%%%EOF\n" % index
        mailbox.add(
            samples.invoice_mail(pdfs=[(f"Invoice {index}.pdf", pdf)], subject=f"n{index}"),
            received=datetime(2026, 11, 1),
        )


def test_the_next_batch_is_fetched_while_this_one_is_checked(store: CheckedStore) -> None:
    mailbox = WatchedMailbox()
    fill(mailbox, 12)  # batches of 4: three
    inspector = OverlapInspector(mailbox, batches=3)

    report = pipeline(mailbox, inspector, store).poll()

    assert inspector.waited_for_next == [True, True]
    assert not mailbox.overlapped, "two threads used the IMAP connection at once"
    assert report.mails_seen == 12
    assert report.forwarded == 12
    assert store.positions == [4, 8, 12]
    assert inspector.prestarted == 1


def test_position_never_passes_an_unrecorded_mail_when_a_prefetch_fails(
    store: CheckedStore,
) -> None:
    mailbox = WatchedMailbox()
    fill(mailbox, 12)
    mailbox.fail_summaries_call = 3  # the third batch's fetch, made during the second's
    inspector = OverlapInspector(mailbox, batches=3)

    with pytest.raises(MailboxError):
        pipeline(mailbox, inspector, store).poll()

    assert store.positions == [4, 8]
    assert store.recorded_uids == set(range(1, 9))
    position = store.position(MAILBOX)
    assert position is not None
    assert position.last_uid == 8
    assert not mailbox.opened, "the connection is closed after the prefetch ended"


def test_a_poll_with_nothing_new_starts_no_workers(store: CheckedStore) -> None:
    mailbox = WatchedMailbox()
    fill(mailbox, 2)
    inspector = OverlapInspector(mailbox, batches=1)
    pipeline(mailbox, inspector, store).poll()

    pipeline(mailbox, inspector, store).poll()

    assert inspector.prestarted == 1
