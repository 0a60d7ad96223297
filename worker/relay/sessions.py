"""Several sessions with the destination at once (INVOICE_RELAY_SMTP_SESSIONS).

Each session is a `Forwarder` of its own, claiming its own documents and marking each
accepted one before the next can be ended, so the duplicate window is one document per
session. A destination that refuses a session as it opens (a server's connection limit)
leaves the work to the others for that call; only when every session that tried was
refused does the call fail, as one refused session would.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from worker.relay.background import Arrivals
from worker.relay.forwarding import Forwarder


class ParallelSessions:
    """`ForwardsDue` over several forwarders (made with `one_of_several` when there is
    more than one); the first runs in the caller's thread."""

    def __init__(self, forwarders: Sequence[Forwarder]) -> None:
        if not forwarders:
            raise ValueError("at least one session is needed")
        self._forwarders = list(forwarders)

    def forward_due(self, arrivals: Arrivals | None = None) -> tuple[int, int, int]:
        """Every session's (forwarded, retried later, failed), added up. What a session
        raised is raised once all have ended (the first session's error first)."""
        first, *others = self._forwarders
        if not others:
            return first.forward_due(arrivals)
        with ThreadPoolExecutor(len(others), thread_name_prefix="session") as pool:
            running: list[Future[tuple[int, int, int]]] = [
                pool.submit(forwarder.forward_due, arrivals.follower() if arrivals else None)
                for forwarder in others
            ]
            try:
                results = [first.forward_due(arrivals)]
            finally:
                # The others end on their own (nothing left to claim, or the stop).
                outcomes = [_outcome(future) for future in running]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        refusals = [forwarder.refused_at_open for forwarder in self._forwarders]
        if refusals[0] is not None and all(refusal is not None for refusal in refusals):
            raise refusals[0]
        forwarded, retried, failed = (sum(column) for column in zip(*results, strict=True))
        return forwarded, retried, failed


def _outcome(future: Future[tuple[int, int, int]]) -> tuple[int, int, int] | BaseException:
    try:
        return future.result()
    except BaseException as exc:  # noqa: BLE001 - raised by forward_due once all ended
        return exc
