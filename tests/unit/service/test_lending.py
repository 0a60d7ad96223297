"""worker.service.lending: the IDLE connection handed to one poll and back."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

import pytest

from worker.errors import MailboxError
from worker.models import FolderStatus, MailSummary
from worker.service.lending import ConnectionDesk, LentMailbox, LoanEnd

STATUS = FolderStatus(uidvalidity=7, uidnext=12, exists=3)


@dataclass
class LoanMailbox:
    """A LendableMailbox that records its calls; `fail` makes the reads raise, and
    `mail_came` is what `end_loan` reports."""

    calls: list[str] = field(default_factory=list)
    fail: bool = False
    mail_came: bool = False
    lent: bool = False

    def begin_loan(self, deadline_seconds: float | None) -> None:
        self.calls.append(f"begin:{deadline_seconds}")
        self.lent = True

    def end_loan(self) -> bool:
        self.calls.append("end")
        self.lent = False
        return self.mail_came

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        self.calls.append(f"search:{after_uid}")
        assert self.lent, "used while not lent"
        if self.fail:
            raise MailboxError("connection dropped during UID SEARCH")
        return [after_uid + 1]

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        self.calls.append("summaries")
        return []

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        self.calls.append(f"sections:{max_bytes}")
        return {}

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        self.calls.append(f"range:{offset}")
        return b""

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        self.calls.append("messages")
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every look at the clock is a second later
        return self.now


def desk_for(mailbox: LoanMailbox, **options: object) -> ConnectionDesk:
    return ConnectionDesk(mailbox, deadline_seconds=1800.0, **options)  # type: ignore[arg-type]


def poll_with(desk: ConnectionDesk, use: bool = True) -> LentMailbox | None:
    """What a poll does: take what is on offer, read on it, give it back."""
    ticket = desk.poll_started()
    lent = desk.take()
    try:
        if lent is not None and use:
            lent.open()
            lent.new_uids(11, None)
    finally:
        if lent is not None:
            lent.close()
        desk.poll_ended(ticket)
    return lent


def test_the_poll_asked_for_reads_on_the_lent_connection_and_gives_it_back() -> None:
    mailbox = LoanMailbox()
    desk = desk_for(mailbox)
    taken: list[LentMailbox | None] = []

    end = desk.lend(STATUS, ask=lambda: taken.append(poll_with(desk)), stop=threading.Event())

    assert end is LoanEnd.BACK
    assert taken[0] is not None
    # The poll's deadline ran while it had the connection, and only then.
    assert mailbox.calls == ["begin:1800.0", "search:11", "end"]
    assert desk.lent == 1
    assert desk.take() is None  # nothing on offer any more


def test_the_folder_status_comes_from_the_watchers_examine_without_uidnext() -> None:
    desk = desk_for(LoanMailbox())
    seen: list[FolderStatus] = []

    def poll() -> None:
        lent = desk.take()
        assert lent is not None
        seen.append(lent.open())
        lent.close()

    desk.lend(STATUS, ask=poll, stop=threading.Event())

    # UIDNEXT 0: unknown, so the poll lists what is past its position.
    assert seen == [FolderStatus(uidvalidity=7, uidnext=0, exists=3)]


def test_mail_announced_while_lent_is_reported() -> None:
    desk = desk_for(LoanMailbox(mail_came=True))

    def poll() -> None:
        poll_with(desk)

    assert desk.lend(STATUS, ask=poll, stop=threading.Event()) is LoanEnd.MAIL_CAME


def test_a_poll_that_fails_on_the_connection_gives_it_back_spoiled() -> None:
    mailbox = LoanMailbox(fail=True)
    desk = desk_for(mailbox)

    def failing_poll() -> None:
        with pytest.raises(MailboxError):
            poll_with(desk)

    assert desk.lend(STATUS, ask=failing_poll, stop=threading.Event()) is LoanEnd.SPOILED
    assert mailbox.calls[-1] == "end"  # the deadline stopped all the same


def test_a_lent_mailbox_refuses_every_call_once_given_back() -> None:
    mailbox = LoanMailbox()
    desk = desk_for(mailbox)
    kept: list[LentMailbox] = []

    def poll() -> None:
        lent = desk.take()
        assert lent is not None
        lent.close()
        lent.close()  # only once
        kept.append(lent)

    desk.lend(STATUS, ask=poll, stop=threading.Event())

    with pytest.raises(MailboxError, match="given back"):
        kept[0].new_uids(1, None)
    with pytest.raises(MailboxError, match="given back"):
        kept[0].fetch_sections({1: ["2"]})
    assert mailbox.calls == ["begin:1800.0", "end"]


def test_a_poll_that_began_after_the_offer_and_ended_without_it_withdraws_it() -> None:
    # Another replica held the poll lease: the poll never reached the reading.
    mailbox = LoanMailbox()
    desk = desk_for(mailbox)

    def locked_out_poll() -> None:
        desk.poll_ended(desk.poll_started())

    end = desk.lend(STATUS, ask=locked_out_poll, stop=threading.Event())

    assert end is LoanEnd.NOT_TAKEN
    assert mailbox.calls == []


def test_a_poll_running_before_the_offer_leaves_it_for_the_one_after() -> None:
    desk = desk_for(LoanMailbox())
    ticket = desk.poll_started()  # a scheduled poll is under way as mail is announced
    outcome: list[LoanEnd] = []
    watcher = threading.Thread(
        target=lambda: outcome.append(desk.lend(STATUS, ask=lambda: None, stop=threading.Event()))
    )
    watcher.start()
    try:
        while desk.poll_started() == ticket:  # the offer is made at once
            threading.Event().wait(0.01)
        desk.poll_ended(ticket)  # it ends without the connection: no withdrawal
        assert poll_with(desk) is not None  # the poll after it takes it
    finally:
        watcher.join(5)
    assert outcome == [LoanEnd.BACK]


def test_an_offer_nobody_takes_lapses() -> None:
    desk = desk_for(LoanMailbox(), offer_seconds=3.0, clock=Clock())

    assert desk.lend(STATUS, ask=lambda: None, stop=threading.Event()) is LoanEnd.NOT_TAKEN


def test_a_stop_ends_an_offer_not_taken() -> None:
    desk = desk_for(LoanMailbox())
    stop = threading.Event()

    assert desk.lend(STATUS, ask=stop.set, stop=stop) is LoanEnd.NOT_TAKEN
    assert desk.take() is None


def test_the_watcher_waits_for_the_poll_that_has_the_connection_even_when_stopping() -> None:
    mailbox = LoanMailbox()
    desk = desk_for(mailbox)
    stop = threading.Event()
    taken = threading.Event()
    give_back = threading.Event()
    returned: list[LoanEnd] = []

    def poll() -> None:
        lent = desk.take()
        assert lent is not None
        taken.set()
        give_back.wait(5)
        lent.close()

    poller = threading.Thread(target=poll)
    watcher = threading.Thread(
        target=lambda: returned.append(desk.lend(STATUS, ask=poller.start, stop=stop))
    )
    watcher.start()
    assert taken.wait(5)
    stop.set()
    watcher.join(0.5)
    assert watcher.is_alive()  # the connection is the poll's: not taken back under it
    give_back.set()
    watcher.join(5)
    poller.join(5)
    assert returned == [LoanEnd.BACK]
    assert mailbox.calls == ["begin:1800.0", "end"]


def test_a_connection_that_cannot_be_lent_is_back_spoiled_and_the_poll_opens_its_own() -> None:
    class Unlendable(LoanMailbox):
        def begin_loan(self, deadline_seconds: float | None) -> None:
            raise MailboxError("not connected (open() first)")

    desk = desk_for(Unlendable())
    taken: list[LentMailbox | None] = []

    end = desk.lend(STATUS, ask=lambda: taken.append(desk.take()), stop=threading.Event())

    assert taken == [None]
    assert end is LoanEnd.SPOILED
