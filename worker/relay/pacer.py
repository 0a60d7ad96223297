"""The send rate cap: `INVOICE_RELAY_MAX_SENDS_PER_MINUTE`, for providers that throttle."""

from __future__ import annotations

import threading
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
        sleep: Callable[[float], object] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """With `stop`, the wait ends as soon as it is set (it sleeps on the event unless
        `sleep` is given): a stopping process must not sit out a 60 s window."""
        if max_per_minute is not None and max_per_minute < 1:
            raise ValueError(f"max_per_minute must be at least 1, got {max_per_minute}")
        self._limit = max_per_minute
        self._clock = clock
        self._stop = stop
        self._sleep = sleep or (stop.wait if stop is not None else time.sleep)
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

    def wait(self) -> bool:
        """Sleep until a send may go, and count it; False (nothing counted) once the
        stop is set."""
        if self._limit is None:
            return not self._stopped()
        # A loop, not one sleep: a clock or sleep that falls short must not let a
        # send through early.
        while (pause := self.delay()) > 0:
            if self._stopped():
                return False
            self._sleep(pause)
        if self._stopped():
            return False
        self._sent_at.append(self._clock())
        return True

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _forget_before(self, now: float) -> None:
        while self._sent_at and self._sent_at[0] <= now - self.WINDOW_SECONDS:
            self._sent_at.popleft()
