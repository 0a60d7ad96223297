"""Ending the process within the grace period a container runtime gives (Kubernetes: 30 s
by default; the relay promises 10 s), whatever a server is doing at that moment.

A stop is asked for by setting an event (SIGTERM, SIGINT): the poll then ends between
mails and hands back what it holds. A network call may keep waiting up to its timeout,
a pool thread with it, and the interpreter joins those threads at exit; so a watchdog
ends the process once the grace is over, after handing this process's leases back.
Nothing in flight is lost by that: a mail not yet recorded stays in the mailbox, a
recorded document stays pending, and a send whose content was not ended cannot be
completed (the fencing check before the final dot fails once the leases are gone).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

GRACE_SECONDS = 8.5  # after the service's own 8 s wait for its poll; under the 10 s promised
_RELEASE_SECONDS = 0.5  # a database that does not answer must not hold the exit


@contextmanager
def exit_within(
    stop: threading.Event,
    *,
    on_expiry: Callable[[], None],
    exit_code: int,
    grace: float = GRACE_SECONDS,
) -> Iterator[None]:
    """Once `stop` is set while the block runs, the process has `grace` seconds to exit
    by itself, the block's end and the interpreter's exit included; then `on_expiry`
    runs (bounded) and the process exits with `exit_code`. The watchdog is a daemon
    thread: a process that exits in time ends it too."""
    finished = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            if finished.is_set():
                return  # the block ended without a stop: nothing to watch
        # A deadline, not a wait for a condition: a process that exits in time never
        # wakes from it.
        time.sleep(grace)
        log.warning(
            "still waiting on a server %.0f s after the stop; exiting without it "
            "(what it held is handed back, nothing recorded is lost)",
            grace,
            extra={"action": "stop_forced"},
        )
        release = threading.Thread(target=on_expiry, name="release-on-exit", daemon=True)
        release.start()
        release.join(_RELEASE_SECONDS)
        logging.shutdown()
        os._exit(exit_code)

    threading.Thread(target=watch, name="stop-watchdog", daemon=True).start()
    try:
        yield
    finally:
        finished.set()
