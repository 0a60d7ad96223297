"""The long-running service: the poll schedule, signals, health and metrics over HTTP.

`Service.run()` polls once at start-up and then on the trigger, never two polls at once,
serves `/livez`, `/healthz` and `/metrics` (through `worker.service.health`), and returns 0 soon
after SIGTERM or SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, Protocol

from apscheduler.events import EVENT_SCHEDULER_STARTED  # type: ignore[import-untyped,unused-ignore]
from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped,unused-ignore]

from worker.errors import InfrastructureError
from worker.models import DEFAULT_ROUTE, PollReport, PollStatus
from worker.relay.lease import LEASE_SECONDS
from worker.service.health import (
    HealthServer,
    HealthSnapshot,
    HealthVerdict,
    UnknownRoute,
    describe_error,
    health_body,
    judge_health,
)
from worker.service.metrics import RelayMetrics
from worker.service.scheduling import DaemonThreadExecutor, misfire_grace_seconds
from worker.service.signals import HANDLED_SIGNALS

_LOG = logging.getLogger(__name__)

_JOB_ID = "poll"
_STARTUP_TIMEOUT = 10.0  # seconds for the scheduler thread to come up


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SideServer(Protocol):
    """Something `run` serves beside the probes (the status page, `worker.web`)."""

    def start(self) -> None:
        """Bind and serve in a thread of its own; a port it cannot bind is a
        `worker.errors.ConfigError` naming the variable."""

    def stop(self) -> None: ...


# --- the service -----------------------------------------------------------------------


class Service:
    """Polls on a schedule and serves health and metrics until `stop_event` is set.

    `poll` runs one poll-and-forward cycle; it should check `stop_event` between mails
    and sends. `clock` is used for health ages only (APScheduler keeps real time).
    `http_port` 0 turns HTTP off.
    """

    def __init__(
        self,
        *,
        poll: Callable[[], PollReport],
        trigger: Any,
        http_port: int,
        healthy_after_seconds: float,
        stop_event: threading.Event,
        metrics: RelayMetrics | None = None,
        clock: Callable[[], datetime] = _utc_now,
        http_host: str = "0.0.0.0",  # noqa: S104 - a container's port is published on purpose
        shutdown_timeout: float = 8.0,
        misfire_grace: int | None = None,
        side_servers: tuple[SideServer, ...] = (),
        locked_retry_seconds: float = LEASE_SECONDS + 1.0,
    ) -> None:
        if not 0 <= http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535, not {http_port}")
        self._poll = poll
        self._trigger = trigger
        self._http_port = http_port
        self._http_host = http_host
        self._healthy_after = healthy_after_seconds
        self._stop_event = stop_event
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._clock = clock
        self._shutdown_timeout = shutdown_timeout
        self._misfire_grace = misfire_grace
        self._side_servers = side_servers
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active_polls = 0
        self._job_running = False  # from hand-over to APScheduler's end of the poll job
        self._poll_wanted = False  # poll_now() came while the job ran: once more after it
        self._found_locked = False  # the last poll found the poll lease held
        self._locked_retry_seconds = locked_retry_seconds
        self._snapshot = HealthSnapshot()
        self._scheduler_thread: threading.Thread | None = None
        self._scheduler: Any = None
        self._server: HealthServer | None = None
        self._signal: int | None = None

    # --- what the endpoints ask --------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        if self._stop_event.is_set():
            return False, "stopping"
        thread = self._scheduler_thread
        if thread is None or not thread.is_alive():
            return False, "scheduler not running"
        return True, "ok"

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def health(self, route: str | None = None) -> tuple[HealthVerdict, dict[str, object]]:
        """The one route's health; the process serves only the route named `default`."""
        if route is not None and route != DEFAULT_ROUTE:
            raise UnknownRoute(route)
        with self._lock:
            snapshot = self._snapshot
        verdict = judge_health(
            snapshot, now=self._clock(), healthy_after_seconds=self._healthy_after
        )
        return verdict, health_body(snapshot, verdict)

    def poll_status(self) -> PollStatus:
        """The last poll and the next one, for the status page."""
        with self._lock:
            snapshot = self._snapshot
        next_poll = None
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            job = scheduler.get_job(_JOB_ID)
            next_poll = None if job is None else job.next_run_time
        finished = [at for at in (snapshot.last_success, snapshot.last_error_at) if at is not None]
        return PollStatus(
            last_finished_at=max(finished, default=None),
            last_success_at=snapshot.last_success,
            last_error=snapshot.last_error,
            last_error_at=snapshot.last_error_at,
            next_poll_at=next_poll,
        )

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where HTTP listens once `run()` bound it (the real port when 0 was asked)."""
        server = self._server
        return None if server is None else server.address

    def poll_now(self) -> None:
        """Run the poll job now (IMAP IDLE announced mail), or, while it runs, once
        more as soon as it has ended; the schedule goes on after it. Ignored before
        start-up and once stopping."""
        with self._lock:
            if self._job_running:
                self._poll_wanted = True
                return
        self._schedule_poll()

    def _schedule_poll(self, delay: float = 0.0) -> None:
        """The poll job now, or `delay` seconds from now when that comes before its next
        scheduled run."""
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running and not self._stop_event.is_set():
            with contextlib.suppress(LookupError):  # the job is gone: shutting down
                when = _utc_now() + timedelta(seconds=delay)
                job = scheduler.get_job(_JOB_ID)
                if job is not None and job.next_run_time is not None:
                    when = min(when, job.next_run_time)
                scheduler.modify_job(_JOB_ID, next_run_time=when)

    def _job_started(self) -> None:
        with self._lock:
            self._job_running = True

    def _job_ended(self) -> None:
        with self._lock:
            self._job_running = False
            wanted, self._poll_wanted = self._poll_wanted, False
            locked, self._found_locked = self._found_locked, False
        if wanted:
            self._schedule_poll()
        elif locked:
            # The poll lease was held: by a peer now polling, or by a relay that died
            # holding it (a restart right after a crash). Ask again once that lease has
            # had time to expire, not a whole schedule interval later.
            self._schedule_poll(self._locked_retry_seconds)

    # --- signals -------------------------------------------------------------------------

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT handler: ask everything to stop; `run()` does the rest."""
        del frame
        self._signal = signum
        self._stop_event.set()

    def _install_signal_handlers(self) -> dict[int, Any]:
        # signal.signal() works only in the main thread; tests run the service elsewhere.
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, self.handle_signal)
        return previous

    # --- one poll ------------------------------------------------------------------------

    def _poll_job(self) -> None:
        with self._lock:
            # Checked under the lock that `run()` waits on, so a poll either starts before
            # shutdown counts it or never starts.
            if self._stop_event.is_set():
                return
            self._active_polls += 1
        started = time.monotonic()
        try:
            report = self._poll()
        except InfrastructureError as exc:
            self._record_failure(exc, time.monotonic() - started)
            _LOG.warning("poll failed: %s", exc, extra={"action": "poll_failed"})
        except Exception as exc:  # noqa: BLE001 - a bug must not end the service; logged below
            self._record_failure(exc, time.monotonic() - started)
            _LOG.exception("poll failed unexpectedly", extra={"action": "poll_failed"})
        else:
            self._record_success(report)
        finally:
            with self._lock:
                self._active_polls -= 1
                self._idle.notify_all()

    def _record_success(self, report: PollReport) -> None:
        if report.locked:
            with self._lock:
                self._found_locked = True
        self.metrics.observe(report)
        now = self._clock()
        # The poll forwarded, but could not act on the mailbox as configured: shown in
        # /healthz as the latest error until it is fixed (the poll itself succeeded).
        problem = report.mail_action_problem
        with self._lock:
            previous = self._snapshot
            self._snapshot = HealthSnapshot(
                polls_finished=previous.polls_finished + 1,
                last_success=now,
                last_error=problem if problem is not None else previous.last_error,
                last_error_at=now if problem is not None else previous.last_error_at,
                # A lock-skipped poll learned nothing about the queue.
                pending=previous.pending if report.locked else report.pending,
                failed=previous.failed if report.locked else report.failed_total,
            )

    def _record_failure(self, error: Exception, duration: float) -> None:
        self.metrics.observe_failure(error, duration)
        now = self._clock()
        with self._lock:
            previous = self._snapshot
            self._snapshot = HealthSnapshot(
                polls_finished=previous.polls_finished + 1,
                last_success=previous.last_success,
                last_error=describe_error(error),
                last_error_at=now,
                pending=previous.pending,
                failed=previous.failed,
            )

    # --- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until `stop_event` is set (by a signal or the caller); 0 on a clean stop,
        1 when the scheduler could not start or died."""
        previous_handlers = self._install_signal_handlers()
        try:
            self._start_http()
            scheduler = self._start_scheduler()
            if scheduler is None:
                return 1
            status = self._wait_for_stop()
            self._stop_scheduler(scheduler)
            return status
        finally:
            self._stop_http()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            _LOG.info("service stopped", extra={"action": "service_stopped"})

    def _start_http(self) -> None:
        if self._http_port != 0:
            self._server = HealthServer.start(self._http_host, self._http_port, self)
        for server in self._side_servers:
            server.start()

    def _start_scheduler(self) -> Any:
        now = _utc_now()
        grace = self._misfire_grace
        if grace is None:
            grace = misfire_grace_seconds(self._trigger, now)
        scheduler = BlockingScheduler(
            timezone="UTC",
            executors={
                "default": DaemonThreadExecutor(on_start=self._job_started, on_end=self._job_ended)
            },
        )
        scheduler.add_job(
            self._poll_job,
            trigger=self._trigger,
            id=_JOB_ID,
            name="poll",
            max_instances=1,  # a slow poll is never overlapped by the next one
            coalesce=True,  # after downtime, one catch-up poll, not a burst
            misfire_grace_time=grace,
            next_run_time=now,  # poll at start-up, then on the trigger
        )
        started = threading.Event()
        scheduler.add_listener(lambda _event: started.set(), EVENT_SCHEDULER_STARTED)
        # A BlockingScheduler in a thread of our own: `/livez` can watch that thread.
        thread = threading.Thread(
            target=scheduler.start, name="invoice-relay-scheduler", daemon=True
        )
        self._scheduler_thread = thread
        self._scheduler = scheduler
        thread.start()
        if not started.wait(_STARTUP_TIMEOUT):
            _LOG.error("the scheduler did not start", extra={"action": "service_failed"})
            return None
        address = self.http_address
        _LOG.info(
            "service started: schedule %s, misfire grace %d s, http %s",
            self._trigger,
            grace,
            f"{address[0]}:{address[1]}" if address else "off",
            extra={"action": "service_started"},
        )
        return scheduler

    def _wait_for_stop(self) -> int:
        thread = self._scheduler_thread
        assert thread is not None
        # A timed wait, so the main thread keeps running Python code to take signals.
        while not self._stop_event.wait(0.5):
            if not thread.is_alive():
                _LOG.error("the scheduler thread died", extra={"action": "service_failed"})
                self._stop_event.set()
                return 1
        reason = signal.Signals(self._signal).name if self._signal is not None else "request"
        _LOG.info(
            "stopping (%s): no new polls; waiting up to %.0f s for the running one",
            reason,
            self._shutdown_timeout,
            extra={"action": "service_stopping"},
        )
        return 0

    def _stop_scheduler(self, scheduler: Any) -> None:
        deadline = time.monotonic() + self._shutdown_timeout
        if scheduler.running:
            # wait=False: our executor has nothing to join; the running poll is waited
            # for below, with a bound.
            scheduler.shutdown(wait=False)
        thread = self._scheduler_thread
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
        with self._idle:
            finished = self._idle.wait_for(
                lambda: self._active_polls == 0, timeout=max(deadline - time.monotonic(), 0.0)
            )
        if not finished:
            _LOG.warning(
                "the running poll did not finish within %.0f s; exiting without it "
                "(its mail stays in the mailbox and is picked up next time)",
                self._shutdown_timeout,
                extra={"action": "poll_abandoned"},
            )

    def _stop_http(self) -> None:
        for server in self._side_servers:
            server.stop()
        if self._server is not None:
            self._server.stop()
