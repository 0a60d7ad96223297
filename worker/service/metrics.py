"""Prometheus metrics of the service, in a registry of their own.

Labels take values from small fixed sets only (poll result, `Outcome`) and the route's
name, which the operator chose: never a sender, subject, filename, address or anything
else that comes from mail, and never a setting's value.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from worker.models import DEFAULT_ROUTE, Outcome, PollReport

# `generate_latest` writes the classic text format, version 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# A poll of an idle mailbox takes well under a second; a backlog of large PDFs, minutes.
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# How late a scheduled poll starts after its fire time: a free worker, a won claim.
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PollResult(enum.Enum):
    OK = "ok"  # the poll completed
    ERROR = "error"  # the poll raised (a server unreachable, or a bug), or its claim failed
    LOCKED = "locked"  # another replica held the mailbox's poll lock; nothing was done
    SKIPPED = "skipped"  # another replica claimed the fire time; this one did not poll


class RelayMetrics:
    """The relay's metrics; `observe*` is called once per poll, `render` per scrape.

    Every metric about a route has a `route` label (route names are settings, never
    mail content); `routes` are the names whose series exist from the start.
    """

    def __init__(self, routes: Iterable[str] = (DEFAULT_ROUTE,)) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._polls = Counter(
            "invoice_relay_polls",
            "Polls by route and result.",
            ["route", "result"],
            registry=self.registry,
        )
        self._pdfs = Counter(
            "invoice_relay_pdfs",
            "New sightings by route and audit outcome (no_pdf counts mails without a PDF).",
            ["route", "outcome"],
            registry=self.registry,
        )
        self._forwards = Counter(
            "invoice_relay_forwards",
            "Forwarded mails the destination accepted, by route.",
            ["route"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "invoice_relay_poll_duration_seconds",
            "How long one poll of a route took, failed ones included.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._last_success = Gauge(
            "invoice_relay_last_success_timestamp_seconds",
            "Unix time when the route's latest completed (or lock-skipped) poll on this "
            "replica finished; 0 before.",
            ["route"],
            registry=self.registry,
        )
        self._pending = Gauge(
            "invoice_relay_pending_forwards",
            "Documents still waiting for a send or a retry after the route's latest poll.",
            ["route"],
            registry=self.registry,
        )
        self._failed = Gauge(
            "invoice_relay_failed_documents",
            "Documents in the failed state after the route's latest poll: a person must look.",
            ["route"],
            registry=self.registry,
        )
        self._start_delay = Histogram(
            "invoice_relay_poll_start_delay_seconds",
            "From a fire time to the start of its poll on this replica (all routes).",
            buckets=_DELAY_BUCKETS,
            registry=self.registry,
        )
        # Every label value exists from the start, so a rate() over a fresh process
        # sees 0 rather than a missing series.
        for route in routes:
            self._add_route(route)

    def _add_route(self, route: str) -> None:
        for result in PollResult:
            self._polls.labels(route=route, result=result.value)
        for outcome in Outcome:
            self._pdfs.labels(route=route, outcome=outcome.value)
        self._forwards.labels(route=route)
        self._duration.labels(route=route)
        for gauge in (self._last_success, self._pending, self._failed):
            gauge.labels(route=route)

    def observe(self, report: PollReport, *, route: str = DEFAULT_ROUTE) -> None:
        """Count one poll of `route` that returned a report."""
        self._duration.labels(route=route).observe(max(report.duration_seconds, 0.0))
        # A replica that found the lock held did no work, but the mailbox is being served:
        # for "when did polling last work" that is a success.
        self._last_success.labels(route=route).set(report.finished_at.timestamp())
        if report.locked:
            self._polls.labels(route=route, result=PollResult.LOCKED.value).inc()
            return
        self._polls.labels(route=route, result=PollResult.OK.value).inc()
        for outcome, count in report.sightings.items():
            if count:
                self._pdfs.labels(route=route, outcome=outcome.value).inc(count)
        if report.forwarded:
            self._forwards.labels(route=route).inc(report.forwarded)
        self._pending.labels(route=route).set(report.pending)
        self._failed.labels(route=route).set(report.failed_total)

    def observe_failure(
        self, error: Exception, duration: float, *, route: str = DEFAULT_ROUTE
    ) -> None:
        """Count one poll of `route` that raised `error` after `duration` seconds.

        The error's type and text are deliberately not labels: they are unbounded.
        """
        del error
        self._polls.labels(route=route, result=PollResult.ERROR.value).inc()
        self._duration.labels(route=route).observe(max(duration, 0.0))

    def observe_skipped(self, *, route: str) -> None:
        """Count one fire time of `route` that another replica claimed."""
        self._polls.labels(route=route, result=PollResult.SKIPPED.value).inc()

    def observe_start_delay(self, seconds: float) -> None:
        """Count one scheduled poll that started `seconds` after its fire time."""
        self._start_delay.observe(max(seconds, 0.0))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (media type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)
