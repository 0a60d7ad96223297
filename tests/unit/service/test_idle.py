"""worker.service.idle: the IDLE watcher against a scripted mailbox, and PollRequests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from worker.errors import MailboxError
from worker.models import FolderStatus, PollReport
from worker.service.idle import IdleEnd, IdleTiming, IdleWatcher, PollRequests, next_backoff

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
    opens: list[bool] = field(default_factory=list)  # False: refused; empty: all succeed

    def clock(self) -> float:
        return self.now

    def open(self) -> FolderStatus:
        self.calls.append("open")
        if self.opens and not self.opens.pop(0):
            raise MailboxError("connection refused", host="imap.test", port=143)
        return FolderStatus(uidvalidity=1, uidnext=1, exists=0)

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
