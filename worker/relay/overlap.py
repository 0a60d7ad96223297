"""What overlaps sending one document in `Forwarder.forward_due`: the next batch is
claimed, and the previous document marked forwarded, each in a thread of its own,
off the sending path. `Tally` counts what the marks settled."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from worker.errors import StoreError
from worker.models import OutgoingDocument, Receipt

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class Tally:
    """What one `forward_due` did so far."""

    forwarded: int = 0
    retried: int = 0
    failed: int = 0

    def result(self) -> tuple[int, int, int]:
        return self.forwarded, self.retried, self.failed


class Claims:
    """Claims the next batch in a thread of its own while this one is sent, so the
    claim's write transaction is off the sending path. The lease of a batch claimed
    ahead is kept alive by the owner's heartbeat (`worker.relay.lease`) while it waits."""

    def __init__(self, claim: Callable[[], list[OutgoingDocument]]) -> None:
        self._claim = claim
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claims")
        self._ahead: Future[list[OutgoingDocument]] | None = None

    def take(self) -> list[OutgoingDocument]:
        """The batch claimed ahead, or, when there is none or it came back empty (more
        may have been recorded since), a batch claimed now; then the next is claimed
        ahead."""
        ahead, self._ahead = self._ahead, None
        batch = ahead.result() if ahead is not None else []
        if not batch:
            batch = self._claim()
        if batch:
            self._ahead = self._executor.submit(self._claim)
        return batch

    def drop(self) -> list[OutgoingDocument]:
        """The documents claimed ahead and not taken, for the caller to release. A claim
        that failed leased nothing (its transaction rolled back): none, and its error
        is only logged, since the loop is ending for a reason of its own."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        try:
            return ahead.result()
        except StoreError as exc:
            log.warning("claiming the next batch failed: %s", exc, extra={"action": "claim_failed"})
            return []

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class Marks:
    """At most one `mark_forwarded` in flight, in a thread of its own; `settle` waits
    for it and raises what it raised."""

    def __init__(
        self,
        mark: Callable[[OutgoingDocument, Receipt], None],
        tally: Tally,
        marked: Callable[[OutgoingDocument, int], None] | None = None,
    ) -> None:
        self._mark = mark
        self._tally = tally
        self._marked = marked
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marks")
        self._pending: tuple[Future[None], OutgoingDocument] | None = None

    def start(self, document: OutgoingDocument, receipt: Receipt) -> None:
        self.settle()
        future = self._executor.submit(self._mark, document, receipt)
        self._pending = (future, document)

    def settle(self) -> None:
        if self._pending is None:
            return
        (future, document), self._pending = self._pending, None
        future.result()
        self._tally.forwarded += 1
        if self._marked is not None:
            self._marked(document, self._tally.forwarded)

    def close(self) -> None:
        """Wait for a mark still in flight (an exception is on its way already)."""
        self._executor.shutdown(wait=True)
