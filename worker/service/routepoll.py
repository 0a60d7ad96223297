"""One fire of one route, on a worker of `worker.service.fleet.Fleet`: the claim, the
poll, and what came of it (the log line, the metrics, the database's record and this
replica's own outcome for the route)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from worker.errors import InfrastructureError
from worker.models import PollReport
from worker.service.health import describe_error
from worker.service.metrics import RelayMetrics
from worker.service.ports import FireClaims

_LOG = logging.getLogger(__name__)

Poll = Callable[[str, datetime], PollReport]


@dataclass(frozen=True, slots=True, kw_only=True)
class FireJob:
    """A poll waiting for a worker."""

    route: str
    fire_time: datetime  # the fire time; for a poll asked for by IDLE, when it was asked
    scheduled: bool  # a fire time, claimed first; False for `Fleet.poll_now` (IDLE)

    @property
    def trigger(self) -> str:
        return "schedule" if self.scheduled else "new_mail"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteOutcome:
    """What this replica knows of a route's polls (other replicas' are in the database)."""

    route: str
    next_fire_at: datetime | None = None  # None before start
    running: bool = False
    polls_finished: int = 0  # polls this replica ran that returned or raised
    last_fire_time: datetime | None = None  # of the latest poll this replica ran
    last_success_at: datetime | None = None
    last_error: str | None = None  # kept after later successes
    last_error_at: datetime | None = None
    pending: int = 0
    failed: int = 0


class RoutePoller:
    """Runs `FireJob`s: thread-safe, shared by every worker."""

    def __init__(
        self,
        *,
        routes: Iterable[str],
        poll: Poll,
        claims: FireClaims,
        owner: str,
        metrics: RelayMetrics,
        now: Callable[[], datetime],
    ) -> None:
        self._poll = poll
        self._claims = claims
        self._owner = owner
        self._metrics = metrics
        self._now = now
        self._lock = threading.Lock()
        self._outcomes = {route: RouteOutcome(route=route) for route in routes}

    def outcomes(self) -> dict[str, RouteOutcome]:
        with self._lock:
            return dict(self._outcomes)

    def run(self, job: FireJob, *, stopping: Callable[[], bool]) -> None:
        """Claim a scheduled fire (unless `stopping`), poll, and record the outcome."""
        fields = {"route": job.route, "fire_time": job.fire_time.isoformat()}
        if job.scheduled and (stopping() or not self._claim(job, fields)):
            return  # when stopping, unclaimed: a peer may still take the fire time
        started = self._now()
        if job.scheduled:
            self._metrics.observe_start_delay((started - job.fire_time).total_seconds())
        _LOG.info(
            "route %s: poll started (fire time %s%s)",
            job.route,
            fields["fire_time"],
            "" if job.scheduled else ", new mail announced",
            extra={"action": "poll_started", **fields, "trigger": job.trigger},
        )
        began = time.monotonic()
        try:
            report = self._poll(job.route, job.fire_time)
        except InfrastructureError as exc:
            _LOG.warning(
                "route %s: poll failed: %s",
                job.route,
                exc,
                extra={"action": "poll_failed", **fields},
            )
            self._failed(job, exc, started=started, duration=time.monotonic() - began)
        except Exception as exc:  # noqa: BLE001 - a bug in one route must not end the others
            _LOG.exception(
                "route %s: poll failed unexpectedly",
                job.route,
                extra={"action": "poll_failed", **fields},
            )
            self._failed(job, exc, started=started, duration=time.monotonic() - began)
        else:
            self._succeeded(job, report)

    def _claim(self, job: FireJob, fields: Mapping[str, str]) -> bool:
        try:
            won = self._claims.claim_fire(job.route, job.fire_time, self._owner)
        except InfrastructureError as exc:
            _LOG.warning(
                "route %s: cannot claim fire time %s: %s",
                job.route,
                fields["fire_time"],
                exc,
                extra={"action": "claim_failed", **fields},
            )
            self._metrics.observe_failure(exc, 0.0, route=job.route)
            self._remember(job, error=describe_error(exc), at=self._now(), counted=False)
            return False
        if not won:
            _LOG.info(
                "route %s: fire time %s claimed by another replica",
                job.route,
                fields["fire_time"],
                extra={"action": "poll_skipped", **fields},
            )
            self._metrics.observe_skipped(route=job.route)
        return won

    def _succeeded(self, job: FireJob, report: PollReport) -> None:
        self._metrics.observe(report, route=job.route)
        problem = report.mail_action_problem
        with self._lock:
            previous = self._outcomes[job.route]
            self._outcomes[job.route] = replace(
                previous,
                polls_finished=previous.polls_finished + 1,
                last_fire_time=job.fire_time,
                last_success_at=report.finished_at,
                # The poll forwarded, but could not act on the mailbox as configured:
                # shown as the latest error until it is fixed.
                last_error=problem if problem is not None else previous.last_error,
                last_error_at=report.finished_at if problem is not None else previous.last_error_at,
                # A lock-skipped poll learned nothing about the queue.
                pending=previous.pending if report.locked else report.pending,
                failed=previous.failed if report.locked else report.failed_total,
            )
        self._record(
            job,
            started_at=report.started_at,
            finished_at=report.finished_at,
            ok=True,
            summary=summarize(report),
            error=problem,
        )

    def _failed(
        self, job: FireJob, error: Exception, *, started: datetime, duration: float
    ) -> None:
        self._metrics.observe_failure(error, duration, route=job.route)
        text = describe_error(error)
        finished = self._now()
        self._remember(job, error=text, at=finished, counted=True)
        self._record(
            job, started_at=started, finished_at=finished, ok=False, summary="failed", error=text
        )

    def _remember(self, job: FireJob, *, error: str, at: datetime, counted: bool) -> None:
        with self._lock:
            previous = self._outcomes[job.route]
            self._outcomes[job.route] = replace(
                previous,
                polls_finished=previous.polls_finished + (1 if counted else 0),
                last_fire_time=job.fire_time if counted else previous.last_fire_time,
                last_error=error,
                last_error_at=at,
            )

    def _record(
        self,
        job: FireJob,
        *,
        started_at: datetime,
        finished_at: datetime,
        ok: bool,
        summary: str,
        error: str | None,
    ) -> None:
        try:
            self._claims.record_route_poll(
                job.route,
                started_at=started_at,
                finished_at=finished_at,
                ok=ok,
                summary=summary,
                error=error,
                owner=self._owner,
            )
        except InfrastructureError as exc:
            _LOG.warning(
                "route %s: could not record the poll: %s",
                job.route,
                exc,
                extra={"action": "poll_unrecorded", "route": job.route},
            )


def summarize(report: PollReport) -> str:
    """One line for the database's record of a poll."""
    if report.locked:
        return "locked: another replica was polling the mailbox"
    return (
        f"{report.mails_seen} mails seen, {report.forwarded} forwarded, "
        f"{report.pending} pending, {report.failed_total} failed"
    )
