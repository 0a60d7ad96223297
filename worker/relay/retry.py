"""Pure decisions about retrying a forwarded mail: when, whether at all, and how long a
send is leased before another sender may take it over."""

from __future__ import annotations

import random
from datetime import timedelta

from worker.models import DATABASE_WAIT_SECONDS, DEFAULT_RETRY_DELAY_SECONDS
from worker.relay.pacer import SendPacer

BASE_DELAY = timedelta(seconds=DEFAULT_RETRY_DELAY_SECONDS)
MAX_DELAY = timedelta(hours=6)
JITTER = 0.2


def retry_delay(
    attempts: int, *, base: timedelta = BASE_DELAY, rng: random.Random | None = None
) -> timedelta:
    """Delay before the next try after `attempts` failed tries (1 = the first failure).

    Exponential from `base` (1 min, 2 min, 4 min, ...) capped at six hours, with +-20 %
    jitter so documents refused together do not come back together.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    if base <= timedelta(0):
        raise ValueError(f"the base delay must be positive, not {base}")
    exponent = min(attempts - 1, 30)  # 2**30 times the base is far past the cap already
    delay: timedelta = min(base * (2**exponent), MAX_DELAY)
    if rng is None:
        return delay
    factor = 1.0 + rng.uniform(-JITTER, JITTER)
    return timedelta(seconds=delay.total_seconds() * factor)


def out_of_attempts(attempts: int, max_attempts: int) -> bool:
    """Whether a document that has been tried `attempts` times must become `failed`."""
    return attempts >= max_attempts


# Network waits that each end within INVOICE_RELAY_TIMEOUT. Opening a session: connect,
# greeting, EHLO, STARTTLS, the TLS handshake, EHLO again, AUTH (up to two round trips).
SESSION_WAITS = 8
# One send: MAIL, RCPT, DATA, the content (sendall is bounded as a whole), the final
# answer, and RSET after a refusal.
SEND_WAITS = 6


def lease_seconds(
    *, timeout_seconds: float, send_batch: int, max_sends_per_minute: int | None = None
) -> float:
    """How long a claim of `send_batch` documents is leased.

    Longer than the whole send of every document in the batch, however slow each step
    is allowed to be, or a slow send would be repeated by another replica: the session
    opens once, then each document waits for the pacer (at most one window per
    `max_sends_per_minute` sends), sends, and records its outcome. A minute on top.
    """
    if timeout_seconds <= 0 or send_batch < 1:
        raise ValueError("the timeout must be positive and the batch at least one document")
    per_send = SEND_WAITS * timeout_seconds + DATABASE_WAIT_SECONDS
    pacing = 0.0
    if max_sends_per_minute is not None:
        windows = -(-send_batch // max_sends_per_minute)  # ceiling division
        pacing = windows * SendPacer.WINDOW_SECONDS
    return SESSION_WAITS * timeout_seconds + send_batch * per_send + pacing + 60.0
