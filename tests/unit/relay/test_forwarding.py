"""The send loop against a fake outbox and the in-memory store: the order of the steps
the crash points name, fresh sessions after a refusal, the retry delay; and the
test-only crash hook itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.documents import add_pending_documents, send_loop
from tests.fakes import FakeOutbox, FakeStore
from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryRejected,
    SessionRefused,
    StoreError,
)
from worker.faults import (
    CRASH_EXIT_STATUS,
    Checkpoint,
    CrashAt,
    CrashHook,
    CrashPoint,
    checkpoint_for,
)
from worker.models import AttemptOutcome, OutgoingDocument, Parcel, Receipt
from worker.relay.forwarding import Forwarder
from worker.relay.pacer import SendPacer

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
def store() -> FakeStore:
    """In memory: the send loop's order of steps needs no SQL (the queue's own SQL is
    tested in store/test_queue.py; the fake is held to it by store/test_contract.py)."""
    return FakeStore()


def states(store: FakeStore) -> dict[str, tuple[str, int]]:
    return {d.sha256: (d.state.value, d.attempts) for d in list(store.documents.values())}


def forwarder(
    store: FakeStore,
    outbox: FakeOutbox,
    *,
    checkpoint: Checkpoint | None = None,
    record: list[tuple[CrashPoint, dict[str, tuple[str, int]]]] | None = None,
    stop: threading.Event | None = None,
) -> Forwarder:
    def seen(point: CrashPoint) -> None:
        if record is not None:
            record.append((point, states(store)))

    return send_loop(store, outbox, now=NOW, send_batch=2, stop=stop, checkpoint=checkpoint or seen)


def test_each_step_happens_in_the_order_the_guarantees_need(store: FakeStore) -> None:
    first, second, third = add_pending_documents(store, 3, now=NOW)
    outbox = FakeOutbox()
    record: list[tuple[CrashPoint, dict[str, tuple[str, int]]]] = []
    assert forwarder(store, outbox, record=record).forward_due() == (3, 0, 0)
    assert [point for point, _ in record] == [
        CrashPoint.AFTER_CLAIM,
        CrashPoint.AFTER_SEND,
        CrashPoint.AFTER_MARK,
        CrashPoint.AFTER_SEND,
        CrashPoint.AFTER_MARK,
        CrashPoint.AFTER_CLAIM,
        CrashPoint.AFTER_SEND,
        CrashPoint.AFTER_MARK,
    ]
    # Accepted by the server, not yet recorded: the documented window.
    assert record[1][1][first] == ("pending", 0)
    assert record[2][1][first] == ("forwarded", 1)
    assert record[5][1][third] == ("pending", 0)
    assert outbox.sent_hashes() == [first, second, third]


def test_a_refused_mail_is_retried_later_over_a_fresh_session(store: FakeStore) -> None:
    first, second = add_pending_documents(store, 2, now=NOW)
    outbox = FakeOutbox()
    outbox.answers = [DeliveryDeferred("451 4.3.0 try later", code=451), None]
    assert forwarder(store, outbox).forward_due() == (1, 1, 0)
    assert outbox.opened == 2  # the refusal may have cost the session: a new one
    assert states(store) == {first: ("pending", 1), second: ("forwarded", 1)}
    (due,) = [d.next_attempt_at for d in store.documents.values() if d.sha256 == first]
    assert timedelta(seconds=8) <= due - NOW <= timedelta(seconds=12)  # base, +-20 %


def tries(store: FakeStore) -> dict[str, list[tuple[AttemptOutcome, str, str]]]:
    return {
        d.sha256: [(a.outcome, a.answer, a.via) for a in d.history]
        for d in store.documents.values()
    }


FOR_NOW = "The destination refused the document for now"  # DeliveryDeferred's text
FOR_GOOD = "The destination refused the document for good"  # DeliveryRejected's


def test_each_try_is_kept_with_its_answer_and_the_destinations_kind(store: FakeStore) -> None:
    first, second, third = add_pending_documents(store, 3, now=NOW)
    outbox = FakeOutbox()
    outbox.answers = [
        DeliveryDeferred("451 4.3.0 try later", code=451),
        None,
        DeliveryRejected("554 5.7.1 no such account", code=554),
    ]
    relay = send_loop(store, outbox, now=NOW, send_batch=3, via="getmyinvoices")
    assert relay.forward_due() == (1, 1, 1)
    assert tries(store) == {
        first: [(AttemptOutcome.RETRY, f"{FOR_NOW}: 451 4.3.0 try later", "getmyinvoices")],
        # An accepted one names its way in the receipt (the fake's is SMTP's).
        second: [(AttemptOutcome.FORWARDED, "250 2.0.0 queued", "smtp")],
        third: [(AttemptOutcome.FAILED, f"{FOR_GOOD}: 554 5.7.1 no such account", "getmyinvoices")],
    }


def test_a_refused_session_is_a_released_try_of_the_document_in_hand_only(
    store: FakeStore,
) -> None:
    first, *rest = add_pending_documents(store, 3, now=NOW)
    outbox = FakeOutbox()
    outbox.refuse_session = True
    with pytest.raises(SessionRefused):
        send_loop(store, outbox, now=NOW, send_batch=3).forward_due()
    (released,) = tries(store)[first]
    assert released[0] is AttemptOutcome.RELEASED and "connection refused" in released[1]
    assert [tries(store)[sha256] for sha256 in rest] == [[], []]  # never begun
    assert states(store)[first] == ("pending", 0)  # not counted


def leased(store: FakeStore) -> list[str]:
    return [d.sha256 for d in store.documents.values() if d.lease_until is not None]


@pytest.mark.parametrize("sent", [1, 2], ids=["mid-batch", "between batches"])
def test_a_stop_releases_the_batch_claimed_ahead_too(store: FakeStore, sent: int) -> None:
    hashes = add_pending_documents(store, 5, now=NOW)
    outbox = FakeOutbox()
    stop = threading.Event()
    sends = 0

    def stop_after_a_send(point: CrashPoint) -> None:
        nonlocal sends
        if point is CrashPoint.AFTER_SEND:
            sends += 1
            if sends == sent:
                stop.set()

    relay = forwarder(store, outbox, checkpoint=stop_after_a_send, stop=stop)
    assert relay.forward_due() == (sent, 0, 0)
    assert outbox.sent_hashes() == hashes[:sent]
    # The rest of the first batch (send_batch is 2) and the whole batch claimed ahead
    # are free again: the next poll, or another replica, sends them without waiting
    # for their lease to run out.
    assert leased(store) == []
    assert sorted(s for s, (state, _) in states(store).items() if state == "pending") == sorted(
        hashes[sent:]
    )


def assert_a_refused_session_leaves_nothing_leased(store: FakeStore, hashes: list[str]) -> None:
    """The second send meets a refused session: the first mail went out, and neither
    the rest of its batch nor the batch claimed ahead stays leased."""
    outbox = FakeOutbox()
    outbox.answers = [None, SessionRefused("421 closing", host="fake", port=25)]
    with pytest.raises(SessionRefused):
        forwarder(store, outbox).forward_due()
    assert outbox.sent_hashes() == hashes[:1]
    assert leased(store) == []


def test_a_refused_session_releases_the_batch_claimed_ahead_too(store: FakeStore) -> None:
    assert_a_refused_session_leaves_nothing_leased(store, add_pending_documents(store, 5, now=NOW))


def test_an_unexpected_error_keeps_only_the_document_in_hand_leased(store: FakeStore) -> None:
    # Something other than SMTP or the database goes wrong before the second mail of a
    # batch of three goes out (here the pacer): that document keeps its lease (it might
    # have gone out), the rest of its batch and the batch claimed ahead are free for the
    # next poll.
    hashes = add_pending_documents(store, 5, now=NOW)

    def broken_sleep(seconds: float) -> None:
        raise RuntimeError("a bug")

    pacer = SendPacer(1, sleep=broken_sleep)  # the second send of a minute must sleep
    relay = send_loop(store, FakeOutbox(), now=NOW, send_batch=3, pacer=pacer)
    with pytest.raises(RuntimeError, match="a bug"):
        relay.forward_due()
    assert leased(store) == hashes[1:2]


class WatchedClaims(FakeStore):
    """A store that writes each claim into `events`; claim number `fail_on`
    raises StoreError instead, as a locked database would."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, ...]] = []
        self.fail_on: int | None = None
        self._claims = 0

    def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_seconds: float, mailbox: str
    ) -> list[OutgoingDocument]:
        self._claims += 1
        if self._claims == self.fail_on:
            raise StoreError("database is locked")
        claimed = super().claim_due(
            now=now, limit=limit, owner=owner, lease_seconds=lease_seconds, mailbox=mailbox
        )
        self.events.append(("claim", *(document.sha256 for document in claimed)))
        return claimed


@pytest.fixture
def watched() -> WatchedClaims:
    return WatchedClaims()


class RecordingOutbox(FakeOutbox):
    """A FakeOutbox that writes each session opening and each send into `events`."""

    def __init__(self, events: list[tuple[str, ...]]) -> None:
        super().__init__()
        self.events = events

    def open(self) -> None:
        super().open()
        self.events.append(("open",))

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        try:
            receipt = super().deliver(parcel, before_final=before_final, more_follows=more_follows)
        except DeliveryRefused:
            self.events.append(("refused", parcel.sha256))
            raise
        self.events.append(("sent", parcel.sha256))
        return receipt


def test_after_a_refusal_the_rest_is_claimed_again_before_a_new_session(
    watched: WatchedClaims,
) -> None:
    # A lease is sized for one session opening; a refusal drops the session, so what is
    # sent over the next one must have been claimed (leased afresh) after the refusal.
    hashes = add_pending_documents(watched, 5, now=NOW)
    events = watched.events
    outbox = RecordingOutbox(events)
    later = DeliveryDeferred("451 4.3.0 try later", code=451)
    outbox.answers = [later, None, later, None, None]
    assert forwarder(watched, outbox).forward_due() == (3, 2, 0)
    assert outbox.opened == 3
    sent_after_refusal = 0
    for position, event in enumerate(events):
        if event[0] != "sent":
            continue
        refusals = [at for at, seen in enumerate(events[:position]) if seen[0] == "refused"]
        if not refusals:
            continue
        claimed_since = {
            sha256
            for seen in events[refusals[-1] : position]
            if seen[0] == "claim"
            for sha256 in seen[1:]
        }
        assert event[1] in claimed_since, events
        sent_after_refusal += 1
    assert sent_after_refusal == 3
    assert sorted(event[1] for event in events if event[0] == "sent") == sorted(
        [hashes[1], hashes[3], hashes[4]]
    )


def test_a_failed_claim_ahead_neither_hides_a_refusal_nor_keeps_leases(
    watched: WatchedClaims,
) -> None:
    hashes = add_pending_documents(watched, 5, now=NOW)
    watched.fail_on = 2  # the first claim made ahead
    assert_a_refused_session_leaves_nothing_leased(watched, hashes)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("after_send", CrashAt(point=CrashPoint.AFTER_SEND, nth=1)),
        ("after_send:3", CrashAt(point=CrashPoint.AFTER_SEND, nth=3)),
        (" AFTER_CLAIM:2 ", CrashAt(point=CrashPoint.AFTER_CLAIM, nth=2)),
        ("after_record", CrashAt(point=CrashPoint.AFTER_RECORD)),
        ("after_mark:1", CrashAt(point=CrashPoint.AFTER_MARK)),
    ],
)
def test_crash_at_parses(text: str, expected: CrashAt) -> None:
    assert CrashAt.from_text(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("before_send", "not a crash point"),
        ("", "not a crash point"),
        ("after_send:0", "whole number"),
        ("after_send:x", "whole number"),
        ("after_send:-1", "whole number"),
    ],
)
def test_crash_at_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrashAt.from_text(text)


def test_the_hook_exits_on_the_nth_time_only() -> None:
    exits: list[int] = []
    hook = CrashHook(CrashAt(point=CrashPoint.AFTER_SEND, nth=2), exit=exits.append)
    for point in (CrashPoint.AFTER_CLAIM, CrashPoint.AFTER_SEND, CrashPoint.AFTER_MARK):
        hook(point)
    assert exits == []
    hook(CrashPoint.AFTER_SEND)
    assert exits == [CRASH_EXIT_STATUS]
    hook(CrashPoint.AFTER_SEND)
    assert exits == [CRASH_EXIT_STATUS]


def test_without_a_setting_checkpoints_do_nothing() -> None:
    checkpoint = checkpoint_for(None)
    for point in CrashPoint:
        checkpoint(point)  # would end the test run if it exited
