"""Failure notices under concurrency, on real SQLite and PostgreSQL: rows that commit out
of id order still reach a notice, and notifiers racing for one mailbox send one notice.

The sender is a fake (notices to a real sink: tests/integration/test_notify.py); the
database, its connections and its transactions are real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.documents import DESTINATION, OWNER, poll_owner
from tests.servers.postgres import temporary_database
from tests.storecases import StoreFactory
from worker.models import (
    DedupMode,
    MailHeaders,
    MailRecord,
    Notice,
    PartRecord,
    ProblemKind,
    SightingKind,
)
from worker.relay.notify import NoticeResult, Notifier
from worker.store.engine import create_schema, make_engine
from worker.store.notices import SqlNoticeLog
from worker.store.schema import notified_sightings, sightings
from worker.store.sqlstore import SqlStore

MAILBOX = "invoices@imap.example/INBOX"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HOUR = 3600.0
WAIT = 10.0  # seconds a thread may take to reach a point it must reach


@dataclass
class HeldSender:
    """A notice sender that keeps each notice's send open until `go` is set, so that
    a racing notifier runs while the first is still sending."""

    go: threading.Event = field(default_factory=threading.Event)
    sent: list[Notice] = field(default_factory=list)
    sending: threading.Event = field(default_factory=threading.Event)

    def open(self) -> None:
        pass

    def send_notice(self, notice: Notice) -> str:
        self.sending.set()
        self.go.wait(WAIT)
        self.sent.append(notice)
        return "250 ok"

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def notifier(store: SqlStore, sender: HeldSender, clock: Clock, *, owner: str) -> Notifier:
    return Notifier(
        log=SqlNoticeLog(store.engine),
        sender=lambda: sender,
        notify_to="owner@shop.example",
        notify_from="relay@shop.example",
        mailbox=MAILBOX,
        owner=owner,
        interval_seconds=HOUR,
        route="shop-a",
        clock=clock,
    )


def covered(sender: HeldSender) -> list[int]:
    """The audit ids every notice sent so far listed, in order."""
    ids = []
    for notice in sender.sent:
        for line in notice.body.splitlines():
            head = line.split()
            if len(head) >= 2 and head[0].isdigit() and head[1] in ("rejected", "error"):
                ids.append(int(head[0]))
    return ids


def insert_rejected(connection: sa.Connection, uid: int) -> int:
    """One rejected sighting as a poll writes it, inside the caller's transaction."""
    return int(
        connection.execute(
            sa.insert(sightings)
            .values(
                mailbox=MAILBOX,
                uidvalidity=1,
                uid=uid,
                part="2",
                received_at=T0,
                kind=SightingKind.REJECTED.value,
                reason=f"not a PDF ({uid})",
                filename=f"{uid}.pdf",
            )
            .returning(sightings.c.id)
        ).scalar_one()
    )


def rejected_ids(store: SqlStore) -> list[int]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            sa.select(sightings.c.id)
            .where(sightings.c.kind == SightingKind.REJECTED.value)
            .order_by(sightings.c.id)
        )
        return [int(row.id) for row in rows]


def race(*notifiers: Notifier, sender: HeldSender) -> list[NoticeResult]:
    """Run the notifiers at once, each in a thread; the one that gets to send holds its
    send open until every other one has come back."""
    results: list[NoticeResult] = []
    barrier = threading.Barrier(len(notifiers))
    sender.go.clear()

    def notify(each: Notifier) -> None:
        barrier.wait(WAIT)
        results.append(each.after_poll())
        if len(results) == len(notifiers) - 1:
            sender.go.set()

    threads = [threading.Thread(target=notify, args=(each,)) for each in notifiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert not any(thread.is_alive() for thread in threads)
    return sorted(results, key=lambda result: result.value)


# --- PostgreSQL: two writers, the lower id committed after the notice ----------------------


@pytest.fixture
def postgres_store(postgres_base_url: str) -> Iterator[SqlStore]:
    """A store on a throw-away PostgreSQL database (`integration`): only PostgreSQL has
    two writing transactions open at once, each holding an id of the sequence."""
    with temporary_database(postgres_base_url) as url:
        engine = make_engine(url)
        create_schema(engine)
        engine.dispose()
        store = SqlStore(url)
        try:
            yield store
        finally:
            store.close()


@pytest.mark.integration
def test_two_writers_committing_out_of_id_order_every_rejected_row_reaches_one_notice(
    postgres_store: SqlStore,
) -> None:
    store = postgres_store
    writers = make_engine(store.engine.url.render_as_string(hide_password=False))
    sender, clock = HeldSender(), Clock()
    sender.go.set()
    try:
        with writers.connect() as first, writers.connect() as second:
            slow = first.begin()
            low = insert_rejected(first, uid=1)  # takes its id now, commits last
            with second.begin():
                high = insert_rejected(second, uid=2)
            assert low < high
            # A poll ends; its notice goes out while the lower id is still uncommitted.
            assert notifier(store, sender, clock, owner="a").after_poll() is NoticeResult.SENT
            assert covered(sender) == [high]
            slow.commit()
    finally:
        writers.dispose()
    # The next notice, from two replicas finishing their polls at once: one sends, about
    # the row the high-water mark of ids would have skipped for good.
    clock.now += timedelta(seconds=HOUR)
    results = race(
        notifier(store, sender, clock, owner="a"),
        notifier(store, sender, clock, owner="b"),
        sender=sender,
    )
    assert NoticeResult.SENT in results
    assert results.count(NoticeResult.SENT) == 1
    assert covered(sender) == [high, low]
    assert sorted(covered(sender)) == rejected_ids(store)


# --- SQLite: ids fall out of order when the highest row gives way --------------------------


def record(store: SqlStore, uid: int, *parts: PartRecord) -> list[int]:
    recorded = store.record_mails(
        owner=poll_owner(store, MAILBOX),
        mailbox=MAILBOX,
        uidvalidity=1,
        mails=[MailRecord(uid=uid, headers=MailHeaders(subject="s"), parts=parts)],
        advance_to=uid,
        dedup=DedupMode.BYTES,
        keep_pdfs=False,
        now=T0,
        destination=DESTINATION,
    )
    store.end_poll_lease(MAILBOX, owner=OWNER)
    return [item.sighting_id for item in recorded]


def rejected_part(uid: int) -> PartRecord:
    return PartRecord(
        part="2", kind=SightingKind.REJECTED, reason="not a PDF", filename=f"{uid}.pdf"
    )


def test_a_row_that_takes_a_notified_rows_id_reaches_the_next_notice(
    store_factory: StoreFactory,
) -> None:
    # SQLite has one writer at a time and gives a new row the highest id plus one: its
    # ids go out of order when the highest row is deleted, as a mail's error placeholder
    # is once a retry reads the mail's parts. The part then takes the placeholder's id,
    # below what a notice already covered. (PostgreSQL's sequence gives a new id.)
    poller, notifying = store_factory(), store_factory()  # two engines, two connections
    sender, clock = HeldSender(), Clock()
    sender.go.set()
    (first,) = record(poller, 1, rejected_part(1))
    (placeholder,) = record(
        poller, 2, PartRecord(part="", kind=SightingKind.ERROR, reason="IMAP timeout")
    )
    assert notifier(notifying, sender, clock, owner="a").after_poll() is NoticeResult.SENT
    assert covered(sender) == [first, placeholder]

    (part,) = record(poller, 2, rejected_part(2))  # the retry: the mail's part, rejected
    if poller.engine.dialect.name == "sqlite":
        assert part == placeholder
    with notifying.engine.connect() as connection:
        assert connection.execute(sa.select(notified_sightings.c.sighting_id)).scalars().all() == [
            first
        ]  # the placeholder's mark went with it

    clock.now += timedelta(seconds=HOUR)
    assert notifier(notifying, sender, clock, owner="a").after_poll() is NoticeResult.SENT
    assert covered(sender) == [first, placeholder, part]
    notice = sender.sent[-1]
    assert "1 rejected" in notice.subject
    assert "(shop-a)" in notice.subject


def test_two_notifiers_racing_for_one_mailbox_send_one_notice(store_factory: StoreFactory) -> None:
    poller = store_factory()
    sender, clock = HeldSender(), Clock()
    ids = [record(poller, uid, rejected_part(uid))[0] for uid in range(1, 4)]
    results = race(
        notifier(store_factory(), sender, clock, owner="a"),
        notifier(store_factory(), sender, clock, owner="b"),
        sender=sender,
    )
    # The loser found the lease taken while the winner was still sending.
    assert results == [NoticeResult.BUSY, NoticeResult.SENT]
    assert len(sender.sent) == 1
    assert covered(sender) == ids
    # Later, both again: nothing is due, and nothing is sent twice.
    clock.now += timedelta(seconds=HOUR)
    again = [notifier(store_factory(), sender, clock, owner=o).after_poll() for o in "ab"]
    assert again == [NoticeResult.NOTHING_NEW, NoticeResult.NOTHING_NEW]
    assert len(sender.sent) == 1


def test_notices_are_per_mailbox(store_factory: StoreFactory) -> None:
    poller = store_factory()
    sender, clock = HeldSender(), Clock()
    sender.go.set()
    (ours,) = record(poller, 1, rejected_part(1))
    other = "other@imap.example/INBOX"
    recorded = poller.record_mails(
        owner=poll_owner(poller, other),
        mailbox=other,
        uidvalidity=1,
        mails=[MailRecord(uid=1, headers=MailHeaders(subject="s"), parts=(rejected_part(1),))],
        advance_to=1,
        dedup=DedupMode.BYTES,
        keep_pdfs=False,
        now=T0,
        destination=DESTINATION,
    )
    assert notifier(poller, sender, clock, owner="a").after_poll() is NoticeResult.SENT
    assert covered(sender) == [ours]
    # The other mailbox's notice is due at once: the interval is per mailbox.
    theirs = Notifier(
        log=SqlNoticeLog(poller.engine),
        sender=lambda: sender,
        notify_to="owner@shop.example",
        notify_from="relay@shop.example",
        mailbox=other,
        owner="a",
        interval_seconds=HOUR,
        route="shop-b",
        clock=clock,
    )
    assert theirs.after_poll() is NoticeResult.SENT
    assert covered(sender) == [ours, recorded[0].sighting_id]
    assert "(shop-b)" in sender.sent[-1].subject
    assert [p.kind for p in SqlNoticeLog(poller.engine).unnotified(other, limit=10)] == []
    assert ProblemKind.REJECTED.value in sender.sent[-1].subject
