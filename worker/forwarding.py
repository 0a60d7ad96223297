"""Forwarding: lease due documents, send each, record what the server answered.

A document is leased before it is sent and marked forwarded only after the SMTP
server accepted it; a refused session releases every lease without counting an
attempt.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from worker.errors import SendRejected, SessionRefused
from worker.outbox import SendPacer, build_forward
from worker.ports import Outbox, Store
from worker.retry import out_of_attempts, retry_delay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRules:
    forward_to: str
    forward_from: str
    keep_pdfs: bool = False
    max_attempts: int = 10
    lease_seconds: float = 3600.0
    send_batch: int = 10


class Forwarder:
    """Sends every due document over one SMTP session per call."""

    def __init__(
        self,
        *,
        rules: ForwardRules,
        outbox: Outbox,
        store: Store,
        pacer: SendPacer,
        clock: Callable[[], datetime],
        rng: random.Random,
        stop: threading.Event,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._config = rules
        self._outbox = outbox
        self._store = store
        self._pacer = pacer
        self._clock = clock
        self._rng = rng
        self._stop = stop
        self._progress = progress

    def forward_due(self) -> tuple[int, int, int]:
        """Send every due document. Returns (forwarded, retried later, failed)."""
        config = self._config
        forwarded = retried = failed = 0
        opened = False
        try:
            while not self._stop.is_set():
                claimed = self._store.claim_due(
                    now=self._clock(), limit=config.send_batch, lease_seconds=config.lease_seconds
                )
                if not claimed:
                    break
                for index, document in enumerate(claimed):
                    if self._stop.is_set():
                        for rest in claimed[index:]:
                            self._store.release(rest.document_id)
                        return forwarded, retried, failed
                    try:
                        if not opened:
                            self._outbox.open()
                            opened = True
                        self._pacer.wait()
                        message = build_forward(
                            document, forward_to=config.forward_to, forward_from=config.forward_from
                        )
                        answer = self._outbox.send(message)
                    except SessionRefused:
                        for rest in claimed[index:]:
                            self._store.release(rest.document_id)
                        raise
                    except SendRejected as refusal:
                        answer_text = str(refusal)
                        attempts = document.attempts + 1
                        if refusal.permanent:
                            self._store.mark_failed(document.document_id, answer=answer_text)
                            failed += 1
                            action = "pdf_failed"
                        elif out_of_attempts(attempts, config.max_attempts):
                            self._store.mark_retry(
                                document.document_id,
                                answer=answer_text,
                                next_attempt_at=self._clock(),
                                failed=True,
                            )
                            failed += 1
                            action = "pdf_failed"
                        else:
                            self._store.mark_retry(
                                document.document_id,
                                answer=answer_text,
                                next_attempt_at=self._clock()
                                + retry_delay(attempts, rng=self._rng),
                                failed=False,
                            )
                            retried += 1
                            action = "pdf_retry_later"
                        log.warning(
                            "forward refused: %s",
                            answer_text,
                            extra={"action": action, "sha256": document.sha256},
                        )
                        continue
                    self._store.mark_forwarded(
                        document.document_id,
                        message_id=str(message["Message-ID"]),
                        answer=answer,
                        now=self._clock(),
                        keep_pdf=config.keep_pdfs,
                    )
                    forwarded += 1
                    log.info(
                        "forwarded %s",
                        document.filename,
                        extra={"action": "pdf_forwarded", "sha256": document.sha256},
                    )
                    self._report_progress(f"{forwarded} forwarded")
        finally:
            if opened:
                self._outbox.close()
        return forwarded, retried, failed

    def _report_progress(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)
