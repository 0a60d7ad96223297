"""Forwarding: lease due documents, send each, record what the server answered.

A document is leased before it is delivered and marked forwarded only after the
destination accepted it; a refused session releases every lease without counting an
attempt.

Running beside the reading of mail is `worker.relay.background`; the claim ahead and
the mark in flight, each in a thread of their own, are `worker.relay.overlap`.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

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
    DeliveryKind,
    OutgoingDocument,
    Parcel,
    Receipt,
)
from worker.relay.background import Arrivals
from worker.relay.overlap import Claims, Marks, Tally
from worker.relay.pacer import SendPacer
from worker.relay.ports import Destination, SendQueue
from worker.relay.retry import BASE_DELAY, out_of_attempts, retry_delay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRules:
    # Where to (FORWARD_TO, FORWARD_FROM) is the destination's own setting.
    mailbox: str  # the polled folder: only the documents its mail introduced are sent
    keep_pdfs: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # renewed by the heartbeat while the owner lives
    send_batch: int = DEFAULT_SEND_BATCH
    retry_base: timedelta = BASE_DELAY
    # Where documents go (INVOICE_RELAY_DELIVERY), for the history of refused attempts;
    # an accepted one says so in its receipt.
    via: str = DeliveryKind.SMTP.value


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
        tally = Tally()
        opened = False
        marks = Marks(self._mark_forwarded, tally, self._marked)
        claims = Claims(self._claim)
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
                        # The document in hand keeps the try in its history; the rest
                        # were not begun.
                        self._store.release(
                            document.document_id,
                            owner=self._owner,
                            answer=str(refusal),
                            via=self._config.via,
                        )
                        self._release(claimed[index + 1 :])
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

    def _before_end(self, document: OutgoingDocument, marks: Marks) -> None:
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
            mailbox=config.mailbox,
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

    def _refused(self, document: OutgoingDocument, refusal: DeliveryRefused, tally: Tally) -> None:
        config = self._config
        answer_text = str(refusal)
        attempts = document.attempts + 1
        if refusal.permanent:
            self._store.mark_failed(
                document.document_id, owner=self._owner, answer=answer_text, via=config.via
            )
            tally.failed += 1
            action = "pdf_failed"
        elif out_of_attempts(attempts, config.max_attempts):
            self._store.mark_retry(
                document.document_id,
                owner=self._owner,
                answer=answer_text,
                next_attempt_at=self._clock(),
                failed=True,
                via=config.via,
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
                via=config.via,
            )
            tally.retried += 1
            action = "pdf_retry_later"
        log.warning(
            "forward refused: %s",
            answer_text,
            extra={"action": action, "sha256": document.sha256},
        )

    def _postponed(
        self, document: OutgoingDocument, throttled: DeliveryThrottled, tally: Tally
    ) -> None:
        resume = self._clock() + timedelta(seconds=throttled.retry_after_seconds)
        # The audit's reason while it waits: which limit, and when it resumes.
        answer = f"pending: {throttled.detail}; resumes {resume:%Y-%m-%d %H:%M} UTC"
        self._store.postpone(
            document.document_id,
            owner=self._owner,
            answer=answer,
            next_attempt_at=resume,
            via=self._config.via,
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
