"""RelayMetrics: what a scrape shows after polls, read back with prometheus-client's parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import MailboxError
from worker.models import Outcome, PollReport
from worker.service.metrics import CONTENT_TYPE, RelayMetrics

NAMED_METRICS = (
    "invoice_relay_polls_total",
    "invoice_relay_pdfs_total",
    "invoice_relay_forwards_total",
    "invoice_relay_poll_duration_seconds_count",
    "invoice_relay_poll_duration_seconds_sum",
    "invoice_relay_poll_duration_seconds_bucket",
    "invoice_relay_last_success_timestamp_seconds",
    "invoice_relay_pending_forwards",
    "invoice_relay_failed_documents",
)

START = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def samples(metrics: RelayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: RelayMetrics, name: str, route: str | None = "default", **labels: str) -> float:
    """A sample's value; `route` None for a metric of the whole process."""
    if route is not None:
        labels["route"] = route
    return samples(metrics)[(name, frozenset(labels.items()))]


def make_report(
    *,
    seconds: float = 2.5,
    sightings: dict[Outcome, int] | None = None,
    forwarded: int = 0,
    pending: int = 0,
    failed: int = 0,
    locked: bool = False,
) -> PollReport:
    return PollReport(
        mailbox="invoices@shop.example",
        started_at=START,
        finished_at=START + timedelta(seconds=seconds),
        sightings=sightings or {},
        forwarded=forwarded,
        pending=pending,
        failed_total=failed,
        locked=locked,
    )


@pytest.mark.parametrize("name", NAMED_METRICS)
def test_a_fresh_registry_exposes_every_named_metric(name: str) -> None:
    names = {sample_name for sample_name, _labels in samples(RelayMetrics())}
    assert name in names


@pytest.mark.parametrize("result", ["ok", "error", "locked", "skipped"])
def test_every_poll_result_starts_at_zero(result: str) -> None:
    assert value(RelayMetrics(), "invoice_relay_polls_total", result=result) == 0


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_starts_at_zero(outcome: Outcome) -> None:
    assert value(RelayMetrics(), "invoice_relay_pdfs_total", outcome=outcome.value) == 0


def test_a_completed_poll_is_counted_with_its_outcomes_and_queue() -> None:
    metrics = RelayMetrics()
    metrics.observe(
        make_report(
            seconds=2.5,
            sightings={Outcome.FORWARDED: 3, Outcome.DUPLICATE: 2, Outcome.NO_PDF: 0},
            forwarded=3,
            pending=4,
            failed=1,
        )
    )
    metrics.observe(make_report(sightings={Outcome.FORWARDED: 1}, forwarded=1, pending=2))

    assert value(metrics, "invoice_relay_polls_total", result="ok") == 2
    assert value(metrics, "invoice_relay_polls_total", result="error") == 0
    assert value(metrics, "invoice_relay_pdfs_total", outcome="forwarded") == 4
    assert value(metrics, "invoice_relay_pdfs_total", outcome="duplicate") == 2
    assert value(metrics, "invoice_relay_pdfs_total", outcome="no_pdf") == 0
    assert value(metrics, "invoice_relay_forwards_total") == 4
    assert value(metrics, "invoice_relay_pending_forwards") == 2  # a gauge: the latest poll's
    assert value(metrics, "invoice_relay_failed_documents") == 0
    assert value(metrics, "invoice_relay_poll_duration_seconds_count") == 2
    assert value(metrics, "invoice_relay_poll_duration_seconds_sum") == pytest.approx(5.0)
    assert value(metrics, "invoice_relay_poll_duration_seconds_bucket", le="5.0") == 2
    assert value(metrics, "invoice_relay_poll_duration_seconds_bucket", le="1.0") == 0
    assert value(metrics, "invoice_relay_last_success_timestamp_seconds") == pytest.approx(
        (START + timedelta(seconds=2.5)).timestamp()
    )


def test_a_locked_poll_counts_as_locked_and_leaves_the_queue_gauges_alone() -> None:
    metrics = RelayMetrics()
    metrics.observe(make_report(pending=5, failed=2))
    metrics.observe(make_report(seconds=9.0, locked=True, sightings={Outcome.FORWARDED: 7}))

    assert value(metrics, "invoice_relay_polls_total", result="locked") == 1
    assert value(metrics, "invoice_relay_polls_total", result="ok") == 1
    assert value(metrics, "invoice_relay_pdfs_total", outcome="forwarded") == 0
    assert value(metrics, "invoice_relay_pending_forwards") == 5
    assert value(metrics, "invoice_relay_failed_documents") == 2
    assert value(metrics, "invoice_relay_last_success_timestamp_seconds") == pytest.approx(
        (START + timedelta(seconds=9.0)).timestamp()
    )


def test_a_failed_poll_counts_as_error_and_keeps_the_last_success() -> None:
    metrics = RelayMetrics()
    metrics.observe(make_report(seconds=1.0, pending=3))
    metrics.observe_failure(MailboxError("connection refused", host="imap.example", port=993), 0.2)

    assert value(metrics, "invoice_relay_polls_total", result="error") == 1
    assert value(metrics, "invoice_relay_poll_duration_seconds_count") == 2
    assert value(metrics, "invoice_relay_pending_forwards") == 3
    assert value(metrics, "invoice_relay_last_success_timestamp_seconds") == pytest.approx(
        (START + timedelta(seconds=1.0)).timestamp()
    )


def test_no_mail_content_or_error_text_reaches_the_exposition() -> None:
    metrics = RelayMetrics()
    metrics.observe(make_report(sightings={Outcome.REJECTED: 1}))
    metrics.observe_failure(RuntimeError("password=hunter2 at imap.secret.example"), 0.1)
    text = metrics.render().decode()
    for secret in ("invoices@shop.example", "hunter2", "imap.secret.example"):
        assert secret not in text


def test_each_instance_has_its_own_registry_and_leaves_the_global_one_alone() -> None:
    first, second = RelayMetrics(), RelayMetrics()
    first.observe(make_report(forwarded=2))
    assert value(first, "invoice_relay_forwards_total") == 2
    assert value(second, "invoice_relay_forwards_total") == 0
    assert b"invoice_relay_" not in generate_latest(REGISTRY)


def test_content_type_is_the_classic_text_format() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


# --- per route -------------------------------------------------------------------------

ROUTED_METRICS = (
    "invoice_relay_polls_total",
    "invoice_relay_pdfs_total",
    "invoice_relay_forwards_total",
    "invoice_relay_poll_duration_seconds_count",
    "invoice_relay_last_success_timestamp_seconds",
    "invoice_relay_pending_forwards",
    "invoice_relay_failed_documents",
)


@pytest.mark.parametrize("name", ROUTED_METRICS)
def test_every_route_metric_exists_for_each_route_from_the_start(name: str) -> None:
    metrics = RelayMetrics(routes=["shop-a", "shop-b"])
    routes = {
        dict(labels).get("route") for sample_name, labels in samples(metrics) if sample_name == name
    }
    assert routes == {"shop-a", "shop-b"}


def test_routes_are_counted_apart() -> None:
    metrics = RelayMetrics(routes=["shop-a", "shop-b"])
    metrics.observe(make_report(forwarded=2, pending=1), route="shop-a")
    metrics.observe(make_report(forwarded=5, pending=4, failed=1), route="shop-b")
    metrics.observe_failure(RuntimeError("down"), 0.5, route="shop-b")
    metrics.observe_skipped(route="shop-a")

    assert value(metrics, "invoice_relay_forwards_total", route="shop-a") == 2
    assert value(metrics, "invoice_relay_forwards_total", route="shop-b") == 5
    assert value(metrics, "invoice_relay_pending_forwards", route="shop-a") == 1
    assert value(metrics, "invoice_relay_pending_forwards", route="shop-b") == 4
    assert value(metrics, "invoice_relay_failed_documents", route="shop-b") == 1
    assert value(metrics, "invoice_relay_polls_total", route="shop-b", result="error") == 1
    assert value(metrics, "invoice_relay_polls_total", route="shop-a", result="error") == 0
    assert value(metrics, "invoice_relay_polls_total", route="shop-a", result="skipped") == 1
    assert value(metrics, "invoice_relay_poll_duration_seconds_count", route="shop-b") == 2


def test_a_route_not_named_at_the_start_gets_its_series_on_its_first_poll() -> None:
    metrics = RelayMetrics(routes=[])
    metrics.observe(make_report(forwarded=1), route="late")
    assert value(metrics, "invoice_relay_forwards_total", route="late") == 1


def test_the_start_delay_is_one_histogram_for_the_process() -> None:
    metrics = RelayMetrics(routes=["shop-a"])
    metrics.observe_start_delay(0.3)
    metrics.observe_start_delay(-1.0)  # a clock step back counts as no delay
    assert value(metrics, "invoice_relay_poll_start_delay_seconds_count", route=None) == 2
    assert value(
        metrics, "invoice_relay_poll_start_delay_seconds_sum", route=None
    ) == pytest.approx(0.3)
    assert (
        value(metrics, "invoice_relay_poll_start_delay_seconds_bucket", route=None, le="0.25") == 1
    )
