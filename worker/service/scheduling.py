"""How APScheduler runs the poll job: the misfire grace chosen from the trigger, and the
executor that runs each poll in a daemon thread and tells the service when it starts and
ends. `worker.service.runner.Service` puts them together."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor, run_job  # type: ignore[import-untyped,unused-ignore]

_FALLBACK_GRACE = 60  # misfire grace when the trigger has no two future fire times


def misfire_grace_seconds(trigger: Any, now: datetime) -> int:
    """How late a scheduled poll may start: half the gap between the trigger's next two
    fire times, rounded up to whole seconds (APScheduler wants an int), at least one.

    A poll that would start later than that is dropped, because the next regular one
    is nearer; `coalesce` already folds a backlog (after a suspend) into one run.
    """
    first = trigger.get_next_fire_time(None, now)
    if first is None:
        return _FALLBACK_GRACE
    second = trigger.get_next_fire_time(first, first)
    if second is None:
        return _FALLBACK_GRACE
    gap: timedelta = second - first
    return max(math.ceil(gap.total_seconds() / 2), 1)


# --- the scheduler's executor ----------------------------------------------------------


class DaemonThreadExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each job in its own daemon thread.

    APScheduler's thread pool uses non-daemon threads that the interpreter joins at exit,
    so a poll stuck on a dead server could hold the process past its shutdown bound.
    `on_start` runs when a job is handed over and `on_end` once APScheduler no longer
    counts it as running: only then may the job be asked to run again (a request before
    it is dropped as an overlap of `max_instances=1`).
    """

    def __init__(self, *, on_start: Callable[[], None], on_end: Callable[[], None]) -> None:
        super().__init__()
        self._on_start = on_start
        self._on_end = on_end

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        def target() -> None:
            try:
                try:
                    events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
                except BaseException as exc:  # noqa: BLE001 - handed to APScheduler, which logs it
                    self._run_job_error(job.id, exc, exc.__traceback__)
                else:
                    self._run_job_success(job.id, events)
            finally:
                self._on_end()

        self._on_start()
        try:
            threading.Thread(target=target, name="invoice-relay-poll", daemon=True).start()
        except BaseException:
            self._on_end()  # no thread, no job: later requests must not wait for it
            raise
