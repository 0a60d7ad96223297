"""Prometheus metrics of the service, in a registry of their own.

Labels take values from small fixed sets only (poll result, `Outcome`): never a sender,
subject, filename, address or anything else that comes from mail or settings.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from worker.models import Outcome, PollReport

# `generate_latest` writes the classic text format, version 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# A poll of an idle mailbox takes well under a second; a backlog of large PDFs, minutes.
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class PollResult(enum.Enum):
    OK = "ok"  # the poll completed
    ERROR = "error"  # the poll raised: a server unreachable, or a bug
    LOCKED = "locked"  # another replica held the mailbox's poll lock; nothing was done


class RelayMetrics:
    """The relay's metrics; `observe*` is called once per poll, `render` per scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._polls = Counter(
            "invoice_relay_polls",
            "Polls by result.",
            ["result"],
            registry=self.registry,
        )
        self._pdfs = Counter(
            "invoice_relay_pdfs",
            "New sightings by audit outcome (no_pdf counts mails without a PDF).",
            ["outcome"],
            registry=self.registry,
        )
        self._forwards = Counter(
            "invoice_relay_forwards",
            "Forwarded mails the SMTP server accepted.",
            registry=self.registry,
        )
        self._duration = Histogram(
            "invoice_relay_poll_duration_seconds",
            "How long one poll took, failed ones included.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._last_success = Gauge(
            "invoice_relay_last_success_timestamp_seconds",
            "Unix time when the latest completed (or lock-skipped) poll finished; 0 before.",
            registry=self.registry,
        )
        self._pending = Gauge(
            "invoice_relay_pending_forwards",
            "Documents still waiting for a send or a retry after the latest poll.",
            registry=self.registry,
        )
        self._failed = Gauge(
            "invoice_relay_failed_documents",
            "Documents in the failed state after the latest poll: a person must look.",
            registry=self.registry,
        )
        # Every label value exists from the start, so a rate() over a fresh process
        # sees 0 rather than a missing series.
        for result in PollResult:
            self._polls.labels(result=result.value)
        for outcome in Outcome:
            self._pdfs.labels(outcome=outcome.value)

    def observe(self, report: PollReport) -> None:
        """Count one poll that returned a report."""
        self._duration.observe(max(report.duration_seconds, 0.0))
        # A replica that found the lock held did no work, but the mailbox is being served:
        # for "when did polling last work" that is a success.
        self._last_success.set(report.finished_at.timestamp())
        if report.locked:
            self._polls.labels(result=PollResult.LOCKED.value).inc()
            return
        self._polls.labels(result=PollResult.OK.value).inc()
        for outcome, count in report.sightings.items():
            if count:
                self._pdfs.labels(outcome=outcome.value).inc(count)
        if report.forwarded:
            self._forwards.inc(report.forwarded)
        self._pending.set(report.pending)
        self._failed.set(report.failed_total)

    def observe_failure(self, error: Exception, duration: float) -> None:
        """Count one poll that raised `error` after `duration` seconds.

        The error's type and text are deliberately not labels: they are unbounded.
        """
        del error
        self._polls.labels(result=PollResult.ERROR.value).inc()
        self._duration.observe(max(duration, 0.0))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (media type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)
