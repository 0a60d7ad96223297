"""Service: the schedule, health, metrics and shutdown, driven in a thread with a fake poll.

HTTP is real (loopback, a free port); signals are delivered for real by the lead's
subprocess test, here the handler is called directly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped,unused-ignore]
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped,unused-ignore]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped,unused-ignore]

from worker.errors import ConfigError, MailboxError
from worker.models import PollReport
from worker.relay.lease import LEASE_SECONDS
from worker.service.health import probe_health
from worker.service.idle import PollRequests
from worker.service.metrics import RelayMetrics
from worker.service.runner import Service
from worker.service.scheduling import misfire_grace_seconds
from worker.service.signals import stop_on_signals

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

# --- pure decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        (IntervalTrigger(seconds=60, timezone="UTC"), 30.0),
        (IntervalTrigger(seconds=1, timezone="UTC"), 1.0),  # never below one second
        (CronTrigger.from_crontab("*/5 * * * *", timezone="UTC"), 150.0),
        (CronTrigger.from_crontab("0 6 * * *", timezone="UTC"), 43_200.0),
        (DateTrigger(run_date=T0 + timedelta(days=1), timezone="UTC"), 60.0),  # one shot
        (DateTrigger(run_date=T0 - timedelta(days=1), timezone="UTC"), 60.0),  # past
    ],
)
def test_misfire_grace_is_half_the_schedule_gap(trigger: object, expected: float) -> None:
    assert misfire_grace_seconds(trigger, T0) == pytest.approx(expected)


# --- helpers for the running service ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def report(*, pending: int = 0, failed: int = 0, locked: bool = False) -> PollReport:
    now = datetime.now(UTC)
    return PollReport(
        mailbox="INBOX",
        started_at=now - timedelta(seconds=0.01),
        finished_at=now,
        pending=pending,
        failed_total=failed,
        locked=locked,
    )


Step = PollReport | Exception


@dataclass
class FakePoll:
    """Returns (or raises) the scripted steps in order, the last one forever.

    `gate`, when given, makes each call wait for it first (a poll in progress).
    """

    steps: list[Step]
    duration: float = 0.0
    gate: threading.Event | None = None
    calls: list[float] = field(default_factory=list)
    finished: int = 0
    running: int = 0
    max_running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> PollReport:
        with self.lock:
            index = len(self.calls)
            self.calls.append(time.monotonic())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                self.gate.wait()
            time.sleep(self.duration)
            step = self.steps[min(index, len(self.steps) - 1)]
            if isinstance(step, Exception):
                raise step
            return step
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1


class FakeClock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Running:
    service: Service
    port: int
    stop_event: threading.Event
    thread: threading.Thread
    result: list[int]

    def stop(self, within: float) -> float:
        """Set the stop event; returns how long `run()` took to return."""
        began = time.monotonic()
        self.stop_event.set()
        self.thread.join(within)
        assert not self.thread.is_alive(), f"run() did not return within {within} s"
        return time.monotonic() - began


@contextmanager
def running_service(
    poll: Callable[[], PollReport],
    *,
    interval: float = 1.0,
    healthy_after_seconds: float = 60.0,
    clock: Callable[[], datetime] | None = None,
    shutdown_timeout: float = 8.0,
    http: bool = True,
    locked_retry_seconds: float | None = None,
) -> Iterator[Running]:
    port = free_port() if http else 0
    stop_event = threading.Event()
    service = Service(
        poll=poll,
        trigger=IntervalTrigger(seconds=interval, timezone="UTC"),
        http_port=port,
        http_host="127.0.0.1",
        healthy_after_seconds=healthy_after_seconds,
        stop_event=stop_event,
        metrics=RelayMetrics(),
        shutdown_timeout=shutdown_timeout,
        clock=clock if clock is not None else (lambda: datetime.now(UTC)),
        locked_retry_seconds=(
            LEASE_SECONDS + 1.0 if locked_retry_seconds is None else locked_retry_seconds
        ),
    )
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run()), daemon=True)
    thread.start()
    running = Running(service, port, stop_event, thread, result)
    try:
        if http:
            wait_until(lambda: get(port, "/livez")[0] == 200)
        yield running
    finally:
        stop_event.set()
        thread.join(15)
    assert result == [0]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.02)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, body, content type); (0, reason, "") when nothing answers."""
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), exc.headers["Content-Type"]
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc), ""


def healthz(port: int) -> tuple[int, dict[str, object]]:
    status, body, content_type = get(port, "/healthz")
    assert content_type == "application/json"
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return status, parsed


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "action", None) == action]


# --- the running service ---------------------------------------------------------------


def test_it_polls_at_start_up_without_waiting_for_the_schedule() -> None:
    poll = FakePoll([report()])
    began = time.monotonic()
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: poll.finished >= 1, timeout=2)
        assert poll.calls[0] - began < 2
        status, body = healthz(running.port)
        assert status == 200
        assert body["status"] == "ok"
    assert len(poll.calls) == 1  # the next one is an hour away


def test_it_polls_again_on_the_trigger() -> None:
    poll = FakePoll([report()])
    with running_service(poll, interval=1):
        wait_until(lambda: len(poll.calls) >= 3, timeout=5)
    gaps = [later - earlier for earlier, later in pairwise(poll.calls)]
    assert all(gap > 0.5 for gap in gaps)


def test_healthz_is_starting_until_the_first_poll_finishes_then_ok() -> None:
    gate = threading.Event()
    poll = FakePoll([report(pending=4, failed=1)], gate=gate)
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: len(poll.calls) == 1)
        assert get(running.port, "/livez")[:2] == (200, "ok\n")
        status, body = healthz(running.port)
        assert (status, body["status"], body["last_success"]) == (503, "starting", None)
        assert probe_health(running.port, ready=True)[0] is False

        gate.set()
        wait_until(lambda: poll.finished == 1)
        status, body = healthz(running.port)
        assert status == 200
        assert body["status"] == "ok"
        assert (body["pending"], body["failed"], body["last_error"]) == (4, 1, None)
        assert isinstance(body["last_success"], str)
        assert datetime.fromisoformat(body["last_success"]) <= datetime.now(UTC)
        ok, text = probe_health(running.port, ready=True)
        assert ok
        assert json.loads(text)["status"] == "ok"


def test_healthz_turns_503_when_polls_fail_for_too_long_while_livez_stays_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.runner")
    clock = FakeClock()
    outage = MailboxError("connection refused", host="imap.example", port=993)
    poll = FakePoll([report(pending=2), outage])
    with running_service(poll, interval=1, healthy_after_seconds=30, clock=clock) as running:
        wait_until(lambda: poll.finished >= 2)  # one success, then at least one failure
        status, body = healthz(running.port)
        assert status == 200  # the last success is still recent
        assert "imap.example:993" in str(body["last_error"])

        clock.advance(31)
        status, body = healthz(running.port)
        assert status == 503
        assert body["status"] == "stale"
        assert "no successful poll" in str(body["reason"])
        assert body["pending"] == 2
        assert get(running.port, "/livez")[0] == 200
        assert probe_health(running.port) == (True, "ok")

        failures_before = poll.finished
        wait_until(lambda: poll.finished > failures_before)  # failures do not stop polling

    failed = actions(caplog, "poll_failed")
    assert failed
    assert all(record.exc_info is None for record in failed)  # expected: one line
    assert "imap.example:993" in failed[0].getMessage()


def test_an_unexpected_error_is_logged_with_its_traceback_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.runner")
    poll = FakePoll([RuntimeError("password=hunter2"), report()])
    with running_service(poll, interval=1) as running:
        wait_until(lambda: poll.finished >= 2)
        status, body = healthz(running.port)
        assert status == 200
        assert body["last_error"] == "unexpected RuntimeError (see the log)"
    failed = actions(caplog, "poll_failed")
    assert len(failed) == 1
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], RuntimeError)


def test_a_locked_poll_counts_as_locked_and_healthy() -> None:
    # A lock held by another replica comes back as a PollReport (worker.cli.polling).
    poll = FakePoll([report(locked=True)])
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: poll.finished == 1)
        wait_until(lambda: healthz(running.port)[0] == 200)
        text = get(running.port, "/metrics")[1]
    assert 'invoice_relay_polls_total{result="locked",route="default"} 1.0' in text


def test_a_locked_poll_is_asked_again_after_a_lease_not_a_whole_interval() -> None:
    # A restart right after a crash finds the dead relay's poll lease still held: the
    # next poll comes once that lease can have expired. The default wait is one lease
    # plus a second (31 s); shortened here to test the mechanism quickly. The kill test
    # of `run` (tests/integration/test_guarantees.py) shows the default end to end.
    poll = FakePoll([report(locked=True), report(), report()])
    with running_service(poll, interval=3600, http=False, locked_retry_seconds=0.2):
        wait_until(lambda: poll.finished >= 2)
        assert poll.calls[1] - poll.calls[0] >= 0.2
        time.sleep(0.5)  # no third poll: only a locked poll is asked again
        assert poll.finished == 2


NAMED_METRICS = (
    "invoice_relay_polls_total",
    "invoice_relay_pdfs_total",
    "invoice_relay_forwards_total",
    "invoice_relay_poll_duration_seconds",
    "invoice_relay_last_success_timestamp_seconds",
    "invoice_relay_pending_forwards",
    "invoice_relay_failed_documents",
)


def test_metrics_endpoint_serves_every_named_metric_and_other_paths_are_404() -> None:
    poll = FakePoll([report(pending=3)])
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: poll.finished == 1)
        wait_until(lambda: healthz(running.port)[0] == 200)
        status, text, content_type = get(running.port, "/metrics")
        missing = [
            path
            for path in ("/", "/livez/x", "/admin", "/metricsx")
            if get(running.port, path)[0] != 404
        ]
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert [name for name in NAMED_METRICS if f"# TYPE {name} " not in text] == []
    assert 'invoice_relay_polls_total{result="ok",route="default"} 1.0' in text
    assert 'invoice_relay_pending_forwards{route="default"} 3.0' in text
    assert missing == []


def test_a_slow_poll_is_never_run_twice_at_once() -> None:
    poll = FakePoll([report()], duration=1.3)
    with running_service(poll, interval=1) as running:
        wait_until(lambda: poll.finished >= 2, timeout=10)
        running.stop(within=5)
    assert poll.max_running == 1
    starts = poll.calls
    assert all(later - earlier >= 1.2 for earlier, later in pairwise(starts))


def test_stop_waits_for_the_running_poll_then_returns_0_and_polls_no_more() -> None:
    poll = FakePoll([report()], duration=0.8)
    with running_service(poll, interval=1) as running:
        wait_until(lambda: poll.running == 1)
        took = running.stop(within=5)
        assert running.result == [0]
        assert poll.running == 0  # it finished before run() returned
        assert took < 2
        calls = len(poll.calls)
        time.sleep(1.5)
        assert len(poll.calls) == calls
        assert get(running.port, "/livez")[0] == 0  # HTTP is closed


def test_stop_is_bounded_when_the_running_poll_hangs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.runner")
    gate = threading.Event()
    poll = FakePoll([report()], gate=gate)
    try:
        with running_service(poll, interval=3600, shutdown_timeout=1.0) as running:
            wait_until(lambda: poll.running == 1)
            took = running.stop(within=5)
            assert running.result == [0]
            assert 0.8 < took < 2.5
            assert poll.running == 1  # abandoned, still stuck
    finally:
        gate.set()
    assert actions(caplog, "poll_abandoned")
    assert [r.levelno for r in actions(caplog, "service_stopped")] == [logging.INFO]


def test_the_signal_handler_stops_the_service(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.runner")
    poll = FakePoll([report()])
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: poll.finished == 1)
        running.service.handle_signal(signal.SIGTERM, None)
        assert running.stop_event.is_set()
        running.thread.join(5)
        assert running.result == [0]
    stopping = actions(caplog, "service_stopping")
    assert len(stopping) == 1
    assert "SIGTERM" in stopping[0].getMessage()
    assert actions(caplog, "service_started")


def test_livez_fails_while_stopping() -> None:
    gate = threading.Event()
    poll = FakePoll([report()], gate=gate)
    try:
        with running_service(poll, interval=3600, shutdown_timeout=3.0) as running:
            wait_until(lambda: poll.running == 1)
            running.stop_event.set()
            status, body, _ = get(running.port, "/livez")
            assert (status, body) == (503, "stopping\n")
            assert probe_health(running.port)[0] is False
            gate.set()
    finally:
        gate.set()


def test_http_port_0_turns_http_off_but_still_polls() -> None:
    poll = FakePoll([report()])
    with running_service(poll, interval=3600, http=False) as running:
        wait_until(lambda: poll.finished == 1)
        assert running.service.http_address is None
        assert running.service.liveness() == (True, "ok")


def test_a_port_in_use_is_a_configuration_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        poll = FakePoll([report()])
        service = Service(
            poll=poll,
            trigger=IntervalTrigger(seconds=3600, timezone="UTC"),
            http_port=port,
            http_host="127.0.0.1",
            healthy_after_seconds=60,
            stop_event=threading.Event(),
        )
        with pytest.raises(ConfigError) as caught:
            service.run()
    assert caught.value.variable == "INVOICE_RELAY_HTTP_PORT"
    assert poll.calls == []


@pytest.mark.parametrize("port", [-1, 65536])
def test_an_impossible_port_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match="http_port"):
        Service(
            poll=FakePoll([report()]),
            trigger=IntervalTrigger(seconds=60, timezone="UTC"),
            http_port=port,
            healthy_after_seconds=60,
            stop_event=threading.Event(),
        )


def test_probe_health_reports_a_non_200_answer() -> None:
    gate = threading.Event()
    try:
        with running_service(FakePoll([report()], gate=gate), interval=3600) as running:
            ok, reason = probe_health(running.port, ready=True)
            gate.set()
    finally:
        gate.set()
    assert ok is False
    assert "503" in reason
    assert "starting" in reason


def test_stop_on_signals_turns_sigterm_into_the_stop_event_and_restores_the_handler() -> None:
    stop_event = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop_event):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_event.wait(2)  # the process is still here: the handler caught it
    assert signal.getsignal(signal.SIGTERM) is before


def test_mail_announced_during_a_poll_gets_one_poll_right_after_it() -> None:
    # PollRequests asks for the follow-up when the poll function returns, while
    # APScheduler still counts the job as running: the Service must run it once the job
    # has ended, however short that moment is (no timing margin).
    gate = threading.Event()
    fake = FakePoll([report()], gate=gate)
    requests: PollRequests
    announced: list[bool] = []

    def poll() -> PollReport:
        if not announced:
            announced.append(True)
            requests.new_mail()  # during the first poll
        return fake()

    requests = PollRequests(poll)
    with running_service(requests.poll, interval=3600) as running:
        service = running.service

        def ask_and_let_the_scheduler_look() -> None:
            service.poll_now()
            # Hold the job's last moment open until the scheduler has looked at it: a
            # request it acted on now would be dropped as an overlap and the job put
            # back on its hourly schedule (the race a timing margin used to paper over).
            job = service._scheduler.get_job("poll")
            wait_until(lambda: job.next_run_time > datetime.now(UTC) + timedelta(minutes=1))

        requests.connect(ask_and_let_the_scheduler_look)
        gate.set()
        wait_until(lambda: fake.finished == 2, timeout=15)
    assert len(fake.calls) == 2  # the start-up poll and exactly one follow-up
    assert fake.max_running == 1


def test_poll_now_while_idle_polls_at_once() -> None:
    fake = FakePoll([report()])
    with running_service(fake, interval=3600) as running:
        wait_until(lambda: fake.finished == 1)
        running.service.poll_now()
        wait_until(lambda: fake.finished == 2)
    assert fake.max_running == 1


def test_a_mail_action_problem_shows_in_healthz_while_the_poll_counts_as_a_success() -> None:
    problem = "the folder 'Done' does not exist (create it; the relay does not)"
    impossible = replace(report(), mail_action_problem=problem)
    poll = FakePoll([impossible])
    with running_service(poll, interval=3600) as running:
        wait_until(lambda: poll.finished >= 1)
        status, body = healthz(running.port)
        assert status == 200
        assert body["status"] == "ok"
        assert body["last_error"] == problem
        assert isinstance(body["last_error_at"], str)
