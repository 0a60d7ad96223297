"""Retry delays, giving up, and the lease that a live owner keeps and a dead one loses."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from worker.cli.wiring import pipeline_config
from worker.config.settings import Settings
from worker.relay.lease import HEARTBEAT_SECONDS, LEASE_SECONDS
from worker.relay.retry import MAX_DELAY, out_of_attempts, retry_delay

MINUTE = timedelta(minutes=1)


@pytest.mark.parametrize(
    ("attempts", "base", "expected"),
    [
        (1, MINUTE, MINUTE),
        (2, MINUTE, 2 * MINUTE),
        (3, MINUTE, 4 * MINUTE),
        (9, MINUTE, 256 * MINUTE),
        (10, MINUTE, MAX_DELAY),  # 512 minutes, capped at six hours
        (1000, MINUTE, MAX_DELAY),
        (1, timedelta(seconds=0.05), timedelta(seconds=0.05)),
        (4, timedelta(seconds=0.05), timedelta(seconds=0.4)),
        (1, timedelta(hours=7), MAX_DELAY),
    ],
)
def test_retry_delay_doubles_from_the_base_up_to_the_cap(
    attempts: int, base: timedelta, expected: timedelta
) -> None:
    assert retry_delay(attempts, base=base) == expected


@pytest.mark.parametrize("attempts", [1, 2, 5, 12])
def test_jitter_stays_within_twenty_percent(attempts: int) -> None:
    plain = retry_delay(attempts).total_seconds()
    rng = random.Random(attempts)
    delays = [retry_delay(attempts, rng=rng).total_seconds() for _ in range(200)]
    assert all(0.8 * plain <= delay <= 1.2 * plain for delay in delays)
    assert len(set(delays)) > 100  # refused together, not back together


@pytest.mark.parametrize(
    ("attempts", "base"), [(0, MINUTE), (-1, MINUTE), (1, timedelta(0)), (1, -MINUTE)]
)
def test_retry_delay_refuses_nonsense(attempts: int, base: timedelta) -> None:
    with pytest.raises(ValueError, match="must be"):
        retry_delay(attempts, base=base)


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "expected"),
    [(1, 10, False), (9, 10, False), (10, 10, True), (11, 10, True), (1, 1, True)],
)
def test_out_of_attempts(attempts: int, max_attempts: int, expected: bool) -> None:
    assert out_of_attempts(attempts, max_attempts) is expected


def _settings(**extra: str) -> Settings:
    environ = {
        "INVOICE_RELAY_IMAP_HOST": "imap.example",
        "INVOICE_RELAY_IMAP_USER": "invoices",
        "INVOICE_RELAY_IMAP_PASSWORD": "pw",
        "INVOICE_RELAY_SMTP_HOST": "smtp.example",
        "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
        "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
        "INVOICE_RELAY_DATABASE_URL": "sqlite:////tmp/relay.db",
    }
    environ.update({f"INVOICE_RELAY_{name}": value for name, value in extra.items()})
    return Settings.from_env(environ)


@pytest.mark.parametrize("timeout", ["0.5", "1", "5", "30", "60", "120", "600", "3600"])
@pytest.mark.parametrize("sends_per_minute", [None, "1", "30"])
def test_the_lease_is_short_whatever_the_timeout(
    timeout: str, sends_per_minute: str | None
) -> None:
    # It used to outlast the slowest whole send of a batch (up to hours with a long
    # timeout), so a crashed sender's documents waited that long. Now a live owner keeps
    # it by renewing it (a heartbeat beating twice and more per lease, and the check
    # before each mail's end), so a slow send is never taken over while its owner lives,
    # and a dead owner's lease ends within a minute whatever the timeout.
    extra = {"TIMEOUT": timeout}
    if sends_per_minute is not None:
        extra["MAX_SENDS_PER_MINUTE"] = sends_per_minute
    config = pipeline_config(_settings(**extra))
    assert config.lease_seconds == LEASE_SECONDS
    assert 2 * HEARTBEAT_SECONDS < LEASE_SECONDS <= 30.0


def test_no_setting_shortens_the_lease() -> None:
    settings = _settings(TEST_LEASE_SECONDS="1")
    assert pipeline_config(settings).lease_seconds == LEASE_SECONDS
    assert "INVOICE_RELAY_TEST_LEASE_SECONDS" in settings.unknown_variables


def test_the_retry_delay_setting_reaches_the_pipeline() -> None:
    assert pipeline_config(_settings()).retry_delay_seconds == 60.0
    assert pipeline_config(_settings(RETRY_DELAY="0.05s")).retry_delay_seconds == 0.05
    assert pipeline_config(_settings(RETRY_DELAY="5m")).retry_delay_seconds == 300.0
