"""Forwarding: lease due documents, send each, record what the server answered.

A document is leased before it is delivered and marked forwarded only after the
destination accepted it; a refused session releases every lease without counting an
attempt.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from worker.errors import (
    DeliveryRefused,
    DeliveryThrottled,
    DeliveryUnavailable,
    LeaseLost,
    StoreError,
    TokenEndpointError,
)
from worker.faults import Checkpoint, CrashPoint, no_checkpoint
from worker.models import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SEND_BATCH,
    OutgoingDocument,
    Parcel,
    Receipt,
)
from worker.relay.pacer import SendPacer
from worker.relay.ports import Destination, SendQueue
from worker.relay.retry import BASE_DELAY, out_of_attempts, retry_delay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRules:
    # Where to (FORWARD_TO, FORWARD_FROM) is the destination's own setting.
    keep_pdfs: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # renewed by the heartbeat while the owner lives
    send_batch: int = DEFAULT_SEND_BATCH
    retry_base: timedelta = BASE_DELAY


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


class Forwarder:
    """Delivers every due document over one session with the destination per call."""

    def __init__(
        self,
        *,
        rules: ForwardRules,
        outbox: Destination,
        store: SendQueue,
        owner: str,
        pacer: SendPacer,
        clock: Callable[[], datetime],
        rng: random.Random,
        stop: threading.Event,
        progress: Callable[[str], None] | None = None,
        checkpoint: Checkpoint = no_checkpoint,
        one_of_several: bool = False,
    ) -> None:
        # One of several sessions (`worker.relay.sessions`): a destination refusing to
        # open it lowers the number of sessions for this call instead of failing it,
        # and the refusal is kept in `refused_at_open` for the group to judge.
        self._one_of_several = one_of_several
        self.refused_at_open: DeliveryUnavailable | TokenEndpointError | None = None
        self._config = rules
        self._outbox = outbox
        self._store = store
        self._owner = owner  # the token of this process's leases
        self._pacer = pacer
        self._clock = clock
        self._rng = rng
        self._stop = stop
        self._progress = progress
        self._checkpoint = checkpoint

    def forward_due(self, arrivals: Arrivals | None = None) -> tuple[int, int, int]:
        """Send every due document. Returns (forwarded, retried later, failed).

        With `arrivals`, it runs beside the reading of mail: when nothing is due it
        waits for the next recorded batch, and returns once reading has ended.

        A document accepted by the destination is marked forwarded in a second thread
        while the next one goes out; that mark is committed before the next delivery can
        become final (`Destination.deliver(before_final=...)`), so at any moment at most
        one accepted document is not yet marked, as if the marks were made in line."""
        tally = _Tally()
        opened = False
        marks = _Marks(self._mark_forwarded, tally, self._marked)
        claims = _Claims(self._claim)
        untouched: list[OutgoingDocument] = []  # claimed, and not one step taken yet
        try:
            while not self._stop.is_set():
                marks.settle()
                claimed = claims.take()
                if not claimed:
                    if arrivals is not None and arrivals.wait_for_more(self._stop):
                        continue
                    break
                untouched = claimed
                self._checkpoint(CrashPoint.AFTER_CLAIM)
                for index, document in enumerate(claimed):
                    if self._stop.is_set():
                        marks.settle()
                        untouched = []
                        self._release(claimed[index:])
                        return tally.result()
                    untouched = claimed[index + 1 :]
                    try:
                        if not opened:
                            self._outbox.open()
                            opened = True
                        if not self._pacer.wait():
                            marks.settle()
                            untouched = []
                            self._release(claimed[index:])
                            return tally.result()
                        receipt = self._outbox.deliver(
                            Parcel.from_outgoing(document),
                            before_final=functools.partial(self._before_end, document, marks),
                            more_follows=index + 1 < len(claimed),
                        )
                        self._checkpoint(CrashPoint.AFTER_SEND)
                    except (DeliveryUnavailable, TokenEndpointError) as refusal:
                        # No token for the SMTP login is as good as no session: nothing
                        # of this document went out.
                        marks.settle()
                        untouched = []
                        self._release(claimed[index:])
                        if self._one_of_several and not opened:
                            log.warning(
                                "a session was refused as it opened; the others go on: %s",
                                refusal,
                                extra={"action": "session_refused"},
                            )
                            self.refused_at_open = refusal
                            return tally.result()
                        raise
                    except DeliveryThrottled as throttled:
                        # A limit, not a fault of the document: it waits, uncounted, and
                        # so does the rest of the batch (the limit is the destination's).
                        marks.settle()
                        self._postponed(document, throttled, tally)
                        untouched = []
                        self._release([*claimed[index + 1 :], *claims.drop()])
                        break
                    except DeliveryRefused as refusal:
                        marks.settle()
                        # The outbox may have dropped a session that died mid-send (or
                        # answered 421): the next document starts a fresh one, and the
                        # rest are released and claimed again for it.
                        self._outbox.close()
                        opened = False
                        self._refused(document, refusal, tally)
                        untouched = []
                        self._release([*claimed[index + 1 :], *claims.drop()])
                        break
                    marks.start(document, receipt)
            marks.settle()
        finally:
            marks.close()
            # Documents claimed and not yet begun, here or ahead (an error is on its
            # way, or a stop came between batches): free for the next poll instead of
            # left to their lease. The document being sent keeps its lease: the server
            # may have accepted it.
            self._release_quietly([*untouched, *claims.drop()])
            claims.close()
            if opened:
                self._outbox.close()
        return tally.result()

    def _before_end(self, document: OutgoingDocument, marks: _Marks) -> None:
        """Right before the mail's content is ended: the previous mail is marked, and
        this one's claim is still ours. A sender frozen past its lease (at the `354`
        answer, say) whose document another process took over must not complete a
        second copy: raising here abandons the mail without its final dot."""
        marks.settle()
        if not self._store.still_holds(
            document.document_id, owner=self._owner, lease_seconds=self._config.lease_seconds
        ):
            raise LeaseLost(f"document {document.document_id}, before its content was ended")

    def _claim(self) -> list[OutgoingDocument]:
        config = self._config
        return self._store.claim_due(
            now=self._clock(),
            limit=config.send_batch,
            owner=self._owner,
            lease_seconds=config.lease_seconds,
        )

    def _release(self, documents: list[OutgoingDocument]) -> None:
        for document in documents:
            self._store.release(document.document_id, owner=self._owner)

    def _release_quietly(self, documents: list[OutgoingDocument]) -> None:
        """`_release` on the way out, perhaps with an error already on its way: a
        failure here leaves the documents to their lease and does not replace it."""
        try:
            self._release(documents)
        except (StoreError, LeaseLost) as exc:
            log.warning(
                "%d documents claimed ahead stay leased until their lease expires: %s",
                len(documents),
                exc,
                extra={"action": "release_failed"},
            )

    def _refused(self, document: OutgoingDocument, refusal: DeliveryRefused, tally: _Tally) -> None:
        config = self._config
        answer_text = str(refusal)
        attempts = document.attempts + 1
        if refusal.permanent:
            self._store.mark_failed(document.document_id, owner=self._owner, answer=answer_text)
            tally.failed += 1
            action = "pdf_failed"
        elif out_of_attempts(attempts, config.max_attempts):
            self._store.mark_retry(
                document.document_id,
                owner=self._owner,
                answer=answer_text,
                next_attempt_at=self._clock(),
                failed=True,
            )
            tally.failed += 1
            action = "pdf_failed"
        else:
            self._store.mark_retry(
                document.document_id,
                owner=self._owner,
                answer=answer_text,
                next_attempt_at=self._clock()
                + retry_delay(attempts, base=config.retry_base, rng=self._rng),
                failed=False,
            )
            tally.retried += 1
            action = "pdf_retry_later"
        log.warning(
            "forward refused: %s",
            answer_text,
            extra={"action": action, "sha256": document.sha256},
        )

    def _postponed(
        self, document: OutgoingDocument, throttled: DeliveryThrottled, tally: _Tally
    ) -> None:
        resume = self._clock() + timedelta(seconds=throttled.retry_after_seconds)
        # The audit's reason while it waits: which limit, and when it resumes.
        answer = f"pending: {throttled.detail}; resumes {resume:%Y-%m-%d %H:%M} UTC"
        self._store.postpone(
            document.document_id, owner=self._owner, answer=answer, next_attempt_at=resume
        )
        tally.retried += 1
        log.info(
            "delivery postponed: %s",
            answer,
            extra={"action": "pdf_postponed", "sha256": document.sha256},
        )

    def _mark_forwarded(self, document: OutgoingDocument, receipt: Receipt) -> None:
        self._store.mark_forwarded(
            document.document_id,
            owner=self._owner,
            message_id=receipt.delivery_id,
            answer=receipt.answer,
            now=self._clock(),
            keep_pdf=self._config.keep_pdfs,
            via=receipt.via,
        )

    def _marked(self, document: OutgoingDocument, forwarded: int) -> None:
        self._checkpoint(CrashPoint.AFTER_MARK)
        log.info(
            "forwarded %s",
            document.filename,
            extra={"action": "pdf_forwarded", "sha256": document.sha256},
        )
        self._report_progress(f"{forwarded} forwarded")

    def _report_progress(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)


@dataclass(slots=True, kw_only=True)
class _Tally:
    """What one `forward_due` did so far."""

    forwarded: int = 0
    retried: int = 0
    failed: int = 0

    def result(self) -> tuple[int, int, int]:
        return self.forwarded, self.retried, self.failed


class _Claims:
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


class _Marks:
    """At most one `mark_forwarded` in flight, in a thread of its own; `settle` waits
    for it and raises what it raised."""

    def __init__(
        self,
        mark: Callable[[OutgoingDocument, Receipt], None],
        tally: _Tally,
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
