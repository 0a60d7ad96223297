"""worker.service.idle: the IDLE watcher against a scripted mailbox, and PollRequests."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from tests.unit.service.test_lending import LoanMailbox
from worker.errors import MailboxError
from worker.models import FolderStatus, PollReport
from worker.service.idle import (
    IdleEnd,
    IdleTiming,
    IdleWatcher,
    PollRequests,
    next_backoff,
    renew_session_after,
)
from worker.service.lending import ConnectionDesk

TIMING = IdleTiming(
    renew_seconds=10.0, check_seconds=1.0, first_backoff_seconds=1.0, max_backoff_seconds=8.0
)


@pytest.mark.parametrize(
    ("previous", "expected"),
    [(0.0, 2.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 8.0), (100.0, 8.0)],
)
def test_backoff_doubles_up_to_the_cap(previous: float, expected: float) -> None:
    assert next_backoff(previous, TIMING) == expected


@dataclass
class ScriptedMailbox:
    """An IdleMailbox whose waits follow a script: one entry per `idle_wait` call,
    True (mail announced), False (nothing) or an exception (the connection dropped).
    A fake clock advances by each wait's timeout; the script's end sets `stop`."""

    stop: threading.Event
    script: list[bool | Exception]
    idle: bool = True
    now: float = 0.0
    calls: list[str] = field(default_factory=list)
    opened_at: float = 0.0
    opens: list[bool] = field(default_factory=list)  # False: refused; empty: all succeed
    # Per open: seconds the session's OAuth2 token has left (None: a password login).
    token_lives: list[float | None] = field(default_factory=list)
    uidnexts: list[int] = field(default_factory=list)  # per open; empty: always 1
    token_life: float | None = None

    def clock(self) -> float:
        return self.now

    def open(self) -> FolderStatus:
        self.calls.append("open")
        if self.opens and not self.opens.pop(0):
            raise MailboxError("connection refused", host="imap.test", port=143)
        self.token_life = self.token_lives.pop(0) if self.token_lives else None
        self.opened_at = self.now
        uidnext = self.uidnexts.pop(0) if self.uidnexts else 1
        return FolderStatus(uidvalidity=1, uidnext=uidnext, exists=0)

    def token_expires_in(self) -> float | None:
        if self.token_life is None:
            return None
        return self.token_life - (self.now - self.opened_at)

    def supports_idle(self) -> bool:
        return self.idle

    def idle_start(self) -> None:
        self.calls.append("idle")

    def idle_wait(self, timeout: float) -> bool:
        self.now += timeout
        if not self.script:
            self.stop.set()
            return False
        step = self.script.pop(0)
        self.calls.append(f"wait:{step}")
        if isinstance(step, Exception):
            raise step
        return step

    def idle_done(self) -> bool:
        self.calls.append("done")
        return False

    def close(self) -> None:
        self.calls.append("close")
        self.token_life = None


def watch(
    script: list[bool | Exception], **options: object
) -> tuple[ScriptedMailbox, list[str], IdleEnd, threading.Event]:
    stop = threading.Event()
    mailbox = ScriptedMailbox(stop=stop, script=script, **options)  # type: ignore[arg-type]
    events: list[str] = []
    mailbox_calls = mailbox.calls

    def on_new_mail() -> None:
        events.append("poll")
        mailbox_calls.append("poll")

    watcher = IdleWatcher(
        mailbox=mailbox, on_new_mail=on_new_mail, stop=stop, timing=TIMING, clock=mailbox.clock
    )
    end = watcher.run()
    return mailbox, events, end, stop


def test_an_announcement_triggers_one_poll_after_leaving_idle() -> None:
    mailbox, events, end, _ = watch([False, True, False])

    assert events == ["poll"]
    assert end is IdleEnd.STOPPED
    # Left IDLE (DONE) before the poll, then IDLE again.
    assert mailbox.calls[:7] == [
        "open",
        "idle",
        "wait:False",
        "wait:True",
        "done",
        "poll",
        "idle",
    ]
    assert mailbox.calls[-1] == "close"


def test_idle_is_reissued_before_the_server_timeout() -> None:
    # renew after 10 s of 1 s waits: the eleventh wait happens in a new IDLE.
    mailbox, events, _, _ = watch([False] * 12)

    assert events == []
    assert mailbox.calls.count("idle") == 2
    first_done = mailbox.calls.index("done")
    assert mailbox.calls[first_done - 10 : first_done] == ["wait:False"] * 10


@pytest.mark.parametrize(
    ("expires_in", "renew_after"),
    [
        (None, None),  # a password login: only the server ends the session
        (3600.0, 3540.0),  # an hour's token: a minute before its end
        (240.0, 180.0),  # under the token source's 5 minute margin: still a minute before
        (120.0, 90.0),  # a short token: a quarter of what is left, within half its life
        (8.0, 6.0),
        (0.0, 0.0),  # expired already: at once
        (-5.0, 0.0),
    ],
)
def test_an_oauth2_session_is_renewed_before_its_token_ends(
    expires_in: float | None, renew_after: float | None
) -> None:
    assert renew_session_after(expires_in, IdleTiming(token_lead_seconds=60.0)) == renew_after


def test_an_oauth2_session_reconnects_before_its_token_expires() -> None:
    # Tokens good for 13 s: each session ends 3.25 s before (a quarter of 13 s), so at
    # 9.75 s, inside the renewal interval of 10 s: DONE, close, a new session.
    mailbox, events, end, _ = watch([False] * 14, token_lives=[13.0, 13.0])

    assert end is IdleEnd.STOPPED
    assert mailbox.calls.count("open") == 2
    first_close = mailbox.calls.index("close")
    assert mailbox.calls[first_close - 2 : first_close + 3] == [
        "wait:False",
        "done",
        "close",
        "open",
        "idle",
    ]
    # 9.75 s in 1 s waits: nine full waits and a short one, then the new session.
    assert mailbox.calls[:first_close].count("wait:False") == 10
    assert events == []  # nothing arrived between the sessions: no poll


def test_mail_between_two_oauth2_sessions_is_polled_for() -> None:
    # Tokens good for 8 s: a new session after 6 s, which sees UIDNEXT moved on.
    mailbox, events, _, _ = watch([False] * 8, token_lives=[8.0, 8.0], uidnexts=[5, 6])

    assert mailbox.calls.count("open") == 2
    assert events == ["poll"]
    assert mailbox.calls.index("poll") == mailbox.calls.index("open", 1) + 1


def test_a_server_without_idle_is_left_to_the_schedule_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.service.idle")

    mailbox, events, end, _ = watch([True], idle=False)

    assert end is IdleEnd.UNSUPPORTED
    assert events == []
    assert "idle" not in mailbox.calls
    assert [r.getMessage() for r in caplog.records] == [
        "the IMAP server offers no IDLE: polling on the schedule only"
    ]


class _NoWaitEvent(threading.Event):
    """`stop` for the reconnect test: backoff waits return at once (and say "not set")."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_a_dropped_connection_reconnects_with_backoff_and_polls_once_back() -> None:
    stop = _NoWaitEvent()
    drop = MailboxError("connection dropped during IDLE", host="imap.test", port=143)
    # Connected, dropped; two refused reconnections, then back.
    mailbox = ScriptedMailbox(
        stop=stop, script=[False, drop, False], opens=[True, False, False, True]
    )
    events: list[str] = []
    watcher = IdleWatcher(
        mailbox=mailbox,
        on_new_mail=lambda: events.append("poll"),
        stop=stop,
        timing=TIMING,
        clock=mailbox.clock,
    )

    end = watcher.run()

    assert end is IdleEnd.STOPPED
    assert mailbox.calls.count("open") == 4
    assert stop.waits == [1.0, 2.0, 4.0]  # the backoff before each reconnection
    assert events == ["poll"]  # mail may have come while disconnected: one poll
    assert mailbox.calls.count("close") == 4


def test_a_bug_in_the_watcher_is_logged_and_the_watcher_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = _NoWaitEvent()
    mailbox = ScriptedMailbox(stop=stop, script=[KeyError("surprise"), False])
    watcher = IdleWatcher(
        mailbox=mailbox, on_new_mail=lambda: None, stop=stop, timing=TIMING, clock=mailbox.clock
    )

    with caplog.at_level(logging.ERROR):
        end = watcher.run()

    assert end is IdleEnd.STOPPED
    assert mailbox.calls.count("open") == 2  # it came back after the failure
    assert stop.waits == [1.0]
    (record,) = [r for r in caplog.records if getattr(r, "action", "") == "idle_failed"]
    assert record.exc_info is not None


# --- PollRequests ----------------------------------------------------------------------


def _report() -> PollReport:
    now = datetime.now(UTC)
    return PollReport(mailbox="m", started_at=now, finished_at=now)


def test_new_mail_between_polls_asks_for_a_poll_at_once() -> None:
    asked: list[str] = []
    requests = PollRequests(_report)
    requests.connect(lambda: asked.append("poll"))

    requests.new_mail()

    assert asked == ["poll"]


def test_new_mail_during_a_poll_asks_once_after_it() -> None:
    asked: list[str] = []
    announcements = [2, 0]  # two during the first poll, none during the second
    requests: PollRequests

    def poll() -> PollReport:
        before = len(asked)
        for _ in range(announcements.pop(0)):
            requests.new_mail()
        assert len(asked) == before  # never while a poll runs
        return _report()

    requests = PollRequests(poll)
    requests.connect(lambda: asked.append("poll"))

    requests.poll()
    requests.poll()  # nothing announced this time: no request after it

    # Asked after the poll returned; the Service runs it once its job has ended
    # (tests/unit/service/test_runner.py: a poll asked for during a poll runs after it).
    assert asked == ["poll"]


def test_a_failed_poll_still_honours_the_request() -> None:
    asked: list[str] = []
    requests: PollRequests

    def poll() -> PollReport:
        requests.new_mail()
        raise MailboxError("connection refused", host="imap.test", port=143)

    requests = PollRequests(poll)
    requests.connect(lambda: asked.append("poll"))

    with pytest.raises(MailboxError):
        requests.poll()

    assert asked == ["poll"]


def test_without_a_service_requests_go_nowhere() -> None:
    requests = PollRequests(_report)
    requests.new_mail()  # nothing connected yet: no error
    poll: Callable[[], PollReport] = requests.poll
    assert poll().mailbox == "m"


# --- the connection lent to the poll asked for (worker.service.lending) -----------------


def watch_lending(
    script: list[bool | Exception], loan: LoanMailbox, **options: object
) -> tuple[ScriptedMailbox, list[str], ConnectionDesk]:
    """The watcher with a desk; each poll it asks for takes the connection, reads on it
    and gives it back (as `worker.cli.polling` does), in the watcher's thread."""
    stop = _NoWaitEvent()
    mailbox = ScriptedMailbox(stop=stop, script=script, **options)  # type: ignore[arg-type]
    desk = ConnectionDesk(loan, deadline_seconds=1800.0)
    events: list[str] = []

    def poll() -> None:
        lent = desk.take()
        events.append("lent poll" if lent is not None else "own poll")
        mailbox.calls.append("poll")
        if lent is not None:
            with contextlib.suppress(MailboxError):
                lent.new_uids(0, None)
            lent.close()

    watcher = IdleWatcher(
        mailbox=mailbox, on_new_mail=poll, stop=stop, timing=TIMING, clock=mailbox.clock, desk=desk
    )
    assert watcher.run() is IdleEnd.STOPPED
    return mailbox, events, desk


def test_an_announced_mail_is_read_on_the_idle_connection_then_idle_again() -> None:
    loan = LoanMailbox()
    mailbox, events, _ = watch_lending([False, True, False], loan)

    assert events == ["lent poll"]
    assert mailbox.calls[:7] == ["open", "idle", "wait:False", "wait:True", "done", "poll", "idle"]
    assert loan.calls == ["begin:1800.0", "search:0", "end"]
    assert mailbox.calls.count("open") == 1  # the connection stayed the watcher's


def test_mail_announced_while_the_poll_read_asks_for_one_more_poll_on_it() -> None:
    class TwiceAnnounced(LoanMailbox):
        def end_loan(self) -> bool:
            super().end_loan()
            return self.calls.count("end") == 1  # the first loan saw an EXISTS

    _, events, desk = watch_lending([True, False], TwiceAnnounced())

    assert events == ["lent poll", "lent poll"]
    assert desk.lent == 2


def test_a_poll_that_failed_on_the_idle_connection_makes_the_watcher_reconnect() -> None:
    loan = LoanMailbox(fail=True)
    mailbox, events, _ = watch_lending([True, False, False], loan)

    # Spoiled: closed and opened anew (after the backoff), then one poll on a
    # connection of its own for what the failed one did not read.
    assert mailbox.calls.count("open") == 2
    assert mailbox.calls.count("close") == 2
    assert events == ["lent poll", "own poll"]


def test_an_oauth2_session_soon_renewed_is_not_lent() -> None:
    # Renewed 60 s before a token that ends in 250 s: less than the lending margin left.
    _, events, desk = watch_lending([True, False], LoanMailbox(), token_lives=[250.0])

    assert events == ["own poll"]
    assert desk.lent == 0
