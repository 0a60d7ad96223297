"""Pure decisions about retrying a forwarded mail: when, and whether at all. (How long a
send is leased: `worker.relay.lease`.)"""

from __future__ import annotations

import random
from datetime import timedelta

from worker.models import DEFAULT_RETRY_DELAY_SECONDS

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
