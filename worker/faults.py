"""Test-only crash points: prove the crash-safe ordering by dying at each named step.

`INVOICE_RELAY_TEST_CRASH_AT=<point>[:<n>]` makes the process end with `os._exit(137)`
(what a SIGKILL looks like to the rest of the system: no cleanup, no commit, no QUIT)
the n-th time it reaches `<point>`. Unset, which is the only way production runs, every
checkpoint is a no-op.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CRASH_EXIT_STATUS = 137  # 128 + SIGKILL, as a shell reports a killed process


class CrashPoint(enum.Enum):
    """The steps of a poll where the ordering matters."""

    AFTER_RECORD = "after_record"  # a batch of mail recorded, position advanced, nothing sent
    AFTER_CLAIM = "after_claim"  # documents leased, no SMTP yet
    AFTER_UPLOAD_STARTED = "after_upload_started"  # an API upload marked started, not sent
    AFTER_SEND = "after_send"  # SMTP accepted one mail, not yet marked forwarded
    AFTER_MARK = "after_mark"  # one mail marked forwarded
    AFTER_COPY = "after_copy"  # a settled mail copied to the move target, not yet expunged
    AFTER_MAIL_ACTION = "after_mail_action"  # flag set or mail moved, not yet recorded


Checkpoint = Callable[[CrashPoint], None]


def no_checkpoint(point: CrashPoint) -> None:
    """Production: reaching a step does nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashAt:
    """Where to crash: `point`, the `nth` time it is reached (1 = the first)."""

    point: CrashPoint
    nth: int = 1

    @classmethod
    def from_text(cls, text: str) -> CrashAt:
        """Parse `<point>[:<n>]`; raise ValueError naming the valid points otherwise."""
        name, _, count = text.strip().partition(":")
        try:
            point = CrashPoint(name.strip().lower())
        except ValueError:
            valid = ", ".join(member.value for member in CrashPoint)
            raise ValueError(f"{name!r} is not a crash point ({valid})") from None
        if not count:
            return cls(point=point)
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"the count after ':' must be a whole number >= 1, not {count!r}")
        return cls(point=point, nth=int(count))


class CrashHook:
    """A checkpoint that ends the process at the configured step; `exit` is injectable."""

    def __init__(self, crash_at: CrashAt, *, exit: Callable[[int], object] = os._exit) -> None:
        self._crash_at = crash_at
        self._exit = exit
        self._reached: Counter[CrashPoint] = Counter()

    def __call__(self, point: CrashPoint) -> None:
        self._reached[point] += 1
        if point is self._crash_at.point and self._reached[point] == self._crash_at.nth:
            log.warning(
                "test crash point %s reached: exiting",
                point.value,
                extra={"action": "test_crash", "point": point.value},
            )
            self._exit(CRASH_EXIT_STATUS)


def checkpoint_for(crash_at: CrashAt | None) -> Checkpoint:
    return no_checkpoint if crash_at is None else CrashHook(crash_at)
