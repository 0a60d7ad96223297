"""The send rate cap: `INVOICE_RELAY_MAX_SENDS_PER_MINUTE`, for providers that throttle."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class SendPacer:
    """Keeps every 60-second window at or under `max_per_minute` sends (None: no cap).

    Call `wait()` right before each send; it sleeps just long enough.
    """

    WINDOW_SECONDS = 60.0

    def __init__(
        self,
        max_per_minute: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_per_minute is not None and max_per_minute < 1:
            raise ValueError(f"max_per_minute must be at least 1, got {max_per_minute}")
        self._limit = max_per_minute
        self._clock = clock
        self._sleep = sleep
        self._sent_at: deque[float] = deque()

    def delay(self) -> float:
        """Seconds `wait()` would sleep now (0.0 when a send may go at once)."""
        if self._limit is None:
            return 0.0
        now = self._clock()
        self._forget_before(now)
        if len(self._sent_at) < self._limit:
            return 0.0
        return max(0.0, self._sent_at[0] + self.WINDOW_SECONDS - now)

    def wait(self) -> None:
        if self._limit is None:
            return
        # A loop, not one sleep: a clock or sleep that falls short must not let a
        # send through early.
        while (pause := self.delay()) > 0:
            self._sleep(pause)
        self._sent_at.append(self._clock())

    def _forget_before(self, now: float) -> None:
        while self._sent_at and self._sent_at[0] <= now - self.WINDOW_SECONDS:
            self._sent_at.popleft()
