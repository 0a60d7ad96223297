"""Service: what it serves beside the probes (the status page) starts and stops with
`run`, and `poll_status` tells the page about the last and the next poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped,unused-ignore]

from worker.errors import MailboxError
from worker.models import PollReport
from worker.service.metrics import RelayMetrics
from worker.service.runner import Service


class RecordingServer:
    def __init__(self, events: list[str], name: str) -> None:
        self._events = events
        self._name = name

    def start(self) -> None:
        self._events.append(f"start {self._name}")

    def stop(self) -> None:
        self._events.append(f"stop {self._name}")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.02)


def test_side_servers_live_as_long_as_run_and_see_the_polls() -> None:
    events: list[str] = []
    polls: list[int] = []
    stop = threading.Event()

    def poll() -> PollReport:
        polls.append(1)
        if len(polls) == 1:
            raise MailboxError("imap.example.com: connection refused")
        now = datetime.now(UTC)
        return PollReport(mailbox="INBOX", started_at=now, finished_at=now)

    service = Service(
        poll=poll,
        trigger=IntervalTrigger(seconds=3600, timezone="UTC"),
        http_port=0,
        healthy_after_seconds=60,
        stop_event=stop,
        metrics=RelayMetrics(),
        side_servers=(RecordingServer(events, "web"),),
    )
    assert service.poll_status().next_poll_at is None  # before start-up: nothing known
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: service.poll_status().last_error is not None)
        status = service.poll_status()
        assert status.last_success_at is None
        assert status.last_finished_at == status.last_error_at
        assert "connection refused" in (status.last_error or "")
        assert events == ["start web"]
        service.poll_now()
        wait_until(lambda: service.poll_status().last_success_at is not None)
        status = service.poll_status()
        assert status.last_finished_at == status.last_success_at
        assert status.next_poll_at is not None and status.next_poll_at > datetime.now(UTC)
    finally:
        stop.set()
        thread.join(15)
    assert result == [0]
    assert events == ["start web", "stop web"]
