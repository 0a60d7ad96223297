"""Retry delays, giving up, and the lease that must outlast a whole send."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from worker.cli.commands import pipeline_config
from worker.config.settings import Settings
from worker.relay.retry import MAX_DELAY, lease_seconds, out_of_attempts, retry_delay

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


def _slowest_send(timeout: float, batch: int, sends_per_minute: int | None) -> float:
    """The longest a claimed batch may take, counted from first principles: opening the
    session (connect, greeting, EHLO, STARTTLS, handshake, EHLO, two AUTH round trips),
    then per document MAIL, RCPT, DATA, the content, the answer and an RSET, each up to
    the timeout, plus SQLite's 30 s busy wait to record it; the pacer may hold each
    group of `sends_per_minute` sends for a minute."""
    session = 8 * timeout
    per_document = 6 * timeout + 30.0
    pacing = 0.0 if sends_per_minute is None else -(-batch // sends_per_minute) * 60.0
    return session + batch * per_document + pacing


@pytest.mark.parametrize("timeout", ["0.5", "1", "5", "30", "60", "120", "600", "3600"])
@pytest.mark.parametrize("sends_per_minute", [None, "1", "30"])
def test_the_lease_outlasts_the_slowest_whole_send(
    timeout: str, sends_per_minute: str | None
) -> None:
    extra = {"TIMEOUT": timeout}
    if sends_per_minute is not None:
        extra["MAX_SENDS_PER_MINUTE"] = sends_per_minute
    config = pipeline_config(_settings(**extra))
    # A batch is claimed while the one before it is sent: its lease covers both.
    slowest = _slowest_send(
        float(timeout),
        2 * config.send_batch,
        None if sends_per_minute is None else int(sends_per_minute),
    )
    assert config.lease_seconds > slowest


def test_only_the_test_override_shortens_the_lease() -> None:
    assert pipeline_config(_settings(TEST_LEASE_SECONDS="1")).lease_seconds == 1.0
    assert pipeline_config(_settings()).lease_seconds > 600


def test_the_retry_delay_setting_reaches_the_pipeline() -> None:
    assert pipeline_config(_settings()).retry_delay_seconds == 60.0
    assert pipeline_config(_settings(RETRY_DELAY="0.05s")).retry_delay_seconds == 0.05
    assert pipeline_config(_settings(RETRY_DELAY="5m")).retry_delay_seconds == 300.0


@pytest.mark.parametrize(("timeout", "batch"), [(0.0, 5), (-1.0, 5), (1.0, 0)])
def test_lease_refuses_nonsense(timeout: float, batch: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        lease_seconds(timeout_seconds=timeout, send_batch=batch)
