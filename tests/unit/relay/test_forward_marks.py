"""The mark of a forwarded mail runs beside the next send, and is committed before the
next mail's terminating dot: at most one accepted mail is ever unmarked."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.documents import add_pending_documents, send_loop
from tests.fakes import FakeOutbox
from worker.errors import StoreError
from worker.models import DocumentState, Parcel, Receipt
from worker.relay.forwarding import Forwarder
from worker.store import schema
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class SlowMarks(SqlStore):
    """A store whose marks take a while, or fail on the n-th."""

    def __init__(self, url: str, *, delay: float = 0.0, fail_on: int | None = None) -> None:
        super().__init__(url)
        self.delay = delay
        self.fail_on = fail_on
        self.marks = 0

    def mark_forwarded(
        self,
        document_id: int,
        *,
        owner: str,
        message_id: str,
        answer: str,
        now: datetime,
        keep_pdf: bool,
        via: str = "smtp",
    ) -> None:
        self.marks += 1
        time.sleep(self.delay)
        if self.marks == self.fail_on:
            raise StoreError("disk I/O error")
        super().mark_forwarded(
            document_id,
            owner=owner,
            message_id=message_id,
            answer=answer,
            now=now,
            keep_pdf=keep_pdf,
            via=via,
        )


class WatchingOutbox(FakeOutbox):
    """Counts, at the moment each mail would be accepted, the accepted mails not yet marked."""

    def __init__(self, unmarked: Callable[[], int]) -> None:
        super().__init__()
        self.unmarked = unmarked
        self.unmarked_at_end: list[int] = []

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        def end() -> None:
            if before_final is not None:
                before_final()
            self.unmarked_at_end.append(self.unmarked())

        return super().deliver(parcel, before_final=end, more_follows=more_follows)


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    store = SqlStore(url)
    create_schema(store.engine)
    store.close()
    yield url


def forwarded(store: SqlStore) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).where(
                    schema.documents.c.state == DocumentState.FORWARDED.value
                )
            ).scalar_one()
        )


def forwarder(store: SqlStore, outbox: FakeOutbox) -> Forwarder:
    return send_loop(store, outbox, now=NOW, send_batch=3)


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_at_most_one_accepted_mail_is_unmarked(url: str, delay: float) -> None:
    store = SlowMarks(url, delay=delay)
    add_pending_documents(store, 7, now=NOW)
    outbox = WatchingOutbox(lambda: len(outbox.sent) - forwarded(store))

    assert forwarder(store, outbox).forward_due() == (7, 0, 0)

    # Before each mail's end, every earlier accepted mail is marked already.
    assert outbox.unmarked_at_end == [0] * 7
    assert forwarded(store) == 7
    store.close()


def test_a_failed_mark_abandons_the_next_mail(url: str) -> None:
    store = SlowMarks(url, fail_on=2)
    add_pending_documents(store, 4, now=NOW)
    outbox = FakeOutbox()

    with pytest.raises(StoreError, match="disk I/O"):
        forwarder(store, outbox).forward_due()

    # The second mail was accepted and its mark failed; the third never ended.
    assert len(outbox.sent) == 2
    assert forwarded(store) == 1
    store.close()
