"""Forwarding beside the reading of mail: a backfill sends what is recorded while the
poll reads on. `Arrivals` tells the sending side that a batch was recorded;
`BackgroundForwarding` runs the send loop in a thread of its own."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class _News:
    """What `Arrivals` and its followers share: how many batches were recorded, and
    whether reading ended."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.batches = 0
        self.ended = False


class Arrivals:
    """Tells a Forwarder running beside the reading of mail that more was recorded."""

    def __init__(self, news: _News | None = None) -> None:
        self._news = news or _News()
        self._seen = 0

    def follower(self) -> Arrivals:
        """Another waiter on the same news (a second session): each sees every batch."""
        return Arrivals(self._news)

    def recorded(self) -> None:
        news = self._news
        with news.changed:
            news.batches += 1
            news.changed.notify_all()

    def ended(self) -> None:
        news = self._news
        with news.changed:
            news.ended = True
            news.changed.notify_all()

    def wait_for_more(self, stop: threading.Event) -> bool:
        """Block until a batch was recorded since the last call (True) or reading
        ended with nothing new (False)."""
        news = self._news
        with news.changed:
            while news.batches == self._seen and not news.ended and not stop.is_set():
                news.changed.wait(0.5)  # wakes for `stop` too
            fresh = news.batches != self._seen
            self._seen = news.batches
            return fresh and not stop.is_set()


class ForwardsDue(Protocol):
    """A `Forwarder`, or several sending at once (`worker.relay.sessions`)."""

    def forward_due(self, arrivals: Arrivals | None = None) -> tuple[int, int, int]: ...


class BackgroundForwarding:
    """`Forwarder.forward_due` in a thread of its own while the poll reads mail, so
    sending overlaps reading; each document is still sent only once it is recorded."""

    def __init__(self, forwarder: ForwardsDue) -> None:
        self.arrivals = Arrivals()
        self._result: tuple[int, int, int] | BaseException = (0, 0, 0)
        self._thread = threading.Thread(target=self._run, args=(forwarder,), name="forwarding")
        self._thread.start()

    def _run(self, forwarder: ForwardsDue) -> None:
        try:
            self._result = forwarder.forward_due(self.arrivals)
        except BaseException as exc:  # noqa: BLE001 - handed to the poll's thread by result()
            self._result = exc

    def finish(self) -> None:
        """Reading has ended: send what is left, then stop."""
        self.arrivals.ended()
        self._thread.join()

    def result(self) -> tuple[int, int, int]:
        """(forwarded, retried later, failed), or what the thread raised."""
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def log_failure(self) -> None:
        """Log what the thread raised, with its traceback, for a poll that fails for
        another reason and so never calls `result`."""
        failure = self._result
        if isinstance(failure, BaseException):
            log.error(
                "forwarding failed while the poll was reading: %s",
                failure,
                exc_info=failure,
                extra={"action": "forwarding_failed"},
            )
