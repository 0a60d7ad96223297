"""SIGTERM and SIGINT as a request to stop cleanly, not an end of the process: for `once`,
and for `run` until `Service.run()` installs its own handlers for the same signals."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(stop_event: threading.Event) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set `stop_event` instead of ending the process.

    For the time before `Service.run()` installs its own handlers (waiting for the
    database at start-up), so a stop then is still clean. Only the main thread can set
    signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop_event.set()

    previous = {signum: signal.signal(signum, handler) for signum in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
