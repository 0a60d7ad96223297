"""One poll: new mail to recorded, claimed, forwarded.

The pipeline sees the outside world only through the Protocols in `worker.relay.ports`.
Order matters for the guarantees: every PDF of a mail is recorded (with its bytes)
before the mailbox position moves past the mail, a document is leased before it is
sent and marked forwarded only after the SMTP server accepted it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from worker.faults import Checkpoint, CrashPoint, no_checkpoint
from worker.mail.trust import TxtLookup
from worker.mail.verdicts import is_vanished
from worker.models import (
    DocumentState,
    FolderStatus,
    MailboxPosition,
    MailRecord,
    Outcome,
    PollReport,
    RecordedSighting,
    SightingKind,
)
from worker.relay.background import BackgroundForwarding, ForwardsDue
from worker.relay.dryrun import PlannedSighting, dry_run
from worker.relay.forwarding import Forwarder, ForwardRules
from worker.relay.intake import FetchedBatch, Intake
from worker.relay.mailparts import IntakeRules
from worker.relay.pacer import SendPacer
from worker.relay.pollconfig import PipelineConfig, recorded_up_to, uid_batches
from worker.relay.ports import Destination, Inspector, Mailbox, PipelineStore
from worker.relay.sessions import ParallelSessions
from worker.relay.tidy import MailTidier, TidyReport, tidy_quietly

log = logging.getLogger(__name__)

_FIRST_BACKFILL_BATCH = 25


class Pipeline:
    """Polls one mailbox and forwards what is new. Build a new one per configuration."""

    def __init__(
        self,
        *,
        config: PipelineConfig,
        mailbox: Mailbox,
        outbox: Destination,
        store: PipelineStore,
        owner: str,
        inspector: Inspector,
        pacer: SendPacer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        stop: threading.Event | None = None,
        progress: Callable[[str], None] | None = None,
        checkpoint: Checkpoint = no_checkpoint,
        txt_lookup: TxtLookup | None = None,  # DNS for DKIM keys (tests inject keys)
        tidier: MailTidier | None = None,  # INVOICE_RELAY_AFTER_FORWARD other than keep
        more_outboxes: Sequence[Destination] = (),  # INVOICE_RELAY_SMTP_SESSIONS above 1
    ) -> None:
        self._config = config
        self._tidier = tidier
        self._checkpoint = checkpoint
        self._mailbox = mailbox
        self._store = store
        # This process's lease token: the caller holds the poll lease under it, and
        # every write of the poll names it (fencing).
        self._owner = owner
        self._clock = clock
        self._stop = stop or threading.Event()
        self._progress = progress
        self._intake = Intake(
            rules=IntakeRules(
                forward_from=config.forward_from,
                allowed_senders=config.allowed_senders,
                max_mail_bytes=config.max_mail_bytes,
                max_pdf_bytes=config.max_pdf_bytes,
                max_parts=config.max_parts,
                max_depth=config.max_depth,
                trust=config.trust,
                batch_bytes=config.batch_bytes,
            ),
            mailbox=mailbox,
            inspector=inspector,
            txt_lookup=txt_lookup,
        )
        rules = ForwardRules(
            mailbox=config.mailbox,
            keep_pdfs=config.keep_pdfs,
            max_attempts=config.max_attempts,
            lease_seconds=config.lease_seconds,
            send_batch=config.send_batch,
            retry_base=timedelta(seconds=config.retry_delay_seconds),
            via=config.delivery.value,
        )
        shared_rng = rng or random.Random()  # noqa: S311 - jitter, not security
        shared_pacer = pacer or SendPacer(None)
        self._forwarder: ForwardsDue = ParallelSessions(
            [
                Forwarder(
                    rules=rules,
                    outbox=session,
                    store=store,
                    owner=owner,
                    pacer=shared_pacer,
                    clock=clock,
                    rng=shared_rng,
                    stop=self._stop,
                    progress=progress,
                    checkpoint=checkpoint,
                    one_of_several=bool(more_outboxes),
                )
                for session in [outbox, *more_outboxes]
            ]
        )

    # --- the poll -------------------------------------------------------------------

    def poll(self) -> PollReport:
        """Read what is new, record it, forward what is due. Raises InfrastructureError
        when a server is unavailable; everything recorded so far stays recorded."""
        started = self._clock()
        config = self._config
        log.info("poll started", extra={"action": "poll_started", "mailbox": config.mailbox})
        sightings: Counter[Outcome] = Counter()
        mails_seen = 0
        rescanned = False
        sending: BackgroundForwarding | None = None
        status = self._mailbox.open()
        try:
            position = self._store.position(config.mailbox)
            last_uid = recorded_up_to(position, status)
            if position is None or position.uidvalidity != status.uidvalidity:
                rescanned = position is not None
                self._start_over(position, status)
            # UIDNEXT says whether anything is new without listing the folder.
            if status.uidnext == 0 or status.uidnext - 1 > last_uid:
                self._intake.prestart()  # the PDF workers start while the UIDs are listed
                uids = self._mailbox.new_uids(last_uid, config.since)
                if len(uids) > config.batch_size:  # a backfill: send while reading on
                    sending = BackgroundForwarding(self._forwarder)
                highest_known = max(status.uidnext - 1, 0)
                first = _FIRST_BACKFILL_BATCH if sending is not None else None
                # Cut by count here; each fetch also stops at the byte budget and hands
                # the rest on, which is then fetched next, before the following chunk.
                chunks = deque(uid_batches(uids, config.batch_size, first=first))
                # While the PDF workers check (and the store records) one batch, a
                # thread of its own fetches the next one: only it uses the mailbox then.
                # Nothing is recorded out of order: batch N+1 is recorded after batch N.
                with ThreadPoolExecutor(1, thread_name_prefix="imap-prefetch") as prefetch:
                    fetching: Future[FetchedBatch] | None
                    fetching = prefetch.submit(
                        self._intake.fetch, chunks.popleft() if chunks else []
                    )
                    while fetching is not None and not self._stop.is_set():
                        # No reference to a batch's PDFs may outlive its recording:
                        # the forwarding reads them back from the store (a 25 MB PDF
                        # would otherwise be held twice while it is sent).
                        fetched, fetching = fetching.result(), None
                        if fetched.rest:
                            fetching = prefetch.submit(
                                self._intake.fetch, fetched.rest, described=fetched.rest_summaries
                            )
                        elif chunks:
                            fetching = prefetch.submit(self._intake.fetch, chunks.popleft())
                        is_last = fetching is None
                        advance_to = max([*fetched.uids, highest_known if is_last else 0, last_uid])
                        mails = self._intake.decide(fetched)
                        del fetched
                        recorded = self._record(
                            status.uidvalidity, mails, advance_to=advance_to, retry=False
                        )
                        del mails
                        if sending is not None:
                            sending.arrivals.recorded()
                        mails_seen += len({r.uid for r in recorded})
                        sightings.update(_outcome(r) for r in recorded if r.inserted)
                        self._report_progress(f"{mails_seen} of {len(uids)} new mails read")
            if not self._stop.is_set():
                sightings.update(self._retry_errors(status.uidvalidity))
        except BaseException:
            self._end_reading(sending)
            if sending is not None:
                # The reading error propagates (and is reported by the caller); the
                # sending thread's own failure would otherwise vanish with it.
                sending.log_failure()
            raise
        self._end_reading(sending)
        forwarding = sending.result() if sending else self._forwarder.forward_due()
        forwarded, retried, failed = forwarding
        # After the send loop, so that what this poll forwarded is settled already.
        tidied = TidyReport()
        if self._tidier is not None and not self._stop.is_set():
            tidied = tidy_quietly(self._tidier, status.uidvalidity)
        counts = self._store.state_counts(config.mailbox)
        report = PollReport(
            mailbox=config.mailbox,
            started_at=started,
            finished_at=self._clock(),
            mails_seen=mails_seen,
            sightings=dict(sightings),
            forwarded=forwarded,
            retried_later=retried,
            failed=failed,
            pending=counts.get(DocumentState.PENDING, 0),
            failed_total=counts.get(DocumentState.FAILED, 0),
            rescanned=rescanned,
            mail_actions=tidied.acted,
            mail_action_problem=tidied.problem,
        )
        log.info(
            "poll finished: %s mails read, %s forwarded, %s pending",
            mails_seen,
            forwarded,
            report.pending,
            extra={"action": "poll_finished", "mailbox": config.mailbox},
        )
        return report

    def _end_reading(self, sending: BackgroundForwarding | None) -> None:
        try:
            self._mailbox.close()
        finally:
            if sending is not None:
                sending.finish()

    def plan(self) -> list[PlannedSighting]:
        """A dry run (`worker.relay.dryrun`): what a poll would record now, without
        writing or sending anything."""
        return dry_run(
            config=self._config, mailbox=self._mailbox, store=self._store, intake=self._intake
        )

    # --- reading mail -----------------------------------------------------------------

    def _start_over(self, position: MailboxPosition | None, status: FolderStatus) -> None:
        """First poll, or a changed UIDVALIDITY: read the folder from UID 1 again."""
        mailbox = self._config.mailbox
        if position is not None:
            log.warning(
                "UIDVALIDITY changed from %s to %s: reading the folder again",
                position.uidvalidity,
                status.uidvalidity,
                extra={"action": "uidvalidity_changed", "mailbox": mailbox},
            )
            # Old UIDs mean nothing now; the rescan reads those mails afresh.
            self._store.abandon_errors(
                mailbox=mailbox,
                uidvalidity=position.uidvalidity,
                uids=None,
                reason="UIDVALIDITY changed: the folder was read again",
            )
        self._store.reset_position(mailbox, status.uidvalidity, owner=self._owner)

    def _retry_errors(self, uidvalidity: int) -> Counter[Outcome]:
        config = self._config
        gave_up = self._store.reject_exhausted_errors(
            mailbox=config.mailbox, max_tries=config.error_retries + 1
        )
        if gave_up:
            log.warning(
                "%s sightings rejected after repeated errors",
                gave_up,
                extra={"action": "errors_given_up"},
            )
        uids = self._store.error_uids(
            mailbox=config.mailbox, uidvalidity=uidvalidity, max_tries=config.error_retries + 1
        )
        result: Counter[Outcome] = Counter()
        for batch in uid_batches(uids, config.batch_size):
            for mails in self._intake.record_batches(batch):
                result.update(self._record_retried(uidvalidity, mails))
        return result

    def _record_retried(self, uidvalidity: int, mails: list[MailRecord]) -> Counter[Outcome]:
        # A mail a person deleted or moved cannot be read again; retrying it on every
        # poll would keep it `error` forever. Its error rows (one per part, perhaps)
        # say it left; a new "vanished" row would leave them standing.
        vanished = [mail.uid for mail in mails if is_vanished(mail.parts)]
        kept = [mail for mail in mails if not is_vanished(mail.parts)]
        mails.clear()  # no reference to the batch's PDFs outlives its recording
        recorded = self._record(uidvalidity, kept, advance_to=None, retry=True)
        if vanished:
            self._store.abandon_errors(
                mailbox=self._config.mailbox,
                uidvalidity=uidvalidity,
                uids=vanished,
                reason="the mail left the mailbox before it could be read again",
            )
        return Counter(_outcome(r) for r in recorded if r.inserted)

    def _record(
        self,
        uidvalidity: int,
        mails: Sequence[MailRecord],
        *,
        advance_to: int | None,
        retry: bool,
    ) -> list[RecordedSighting]:
        recorded = self._store.record_mails(
            mailbox=self._config.mailbox,
            uidvalidity=uidvalidity,
            mails=mails,
            advance_to=advance_to,
            dedup=self._config.dedup,
            keep_pdfs=self._config.keep_pdfs,
            now=self._clock(),
            owner=self._owner,
            destination=self._config.destination,
            route=self._config.route,
        )
        self._checkpoint(CrashPoint.AFTER_RECORD)
        for sighting in recorded:
            _log_sighting(sighting, retry=retry)
        return recorded

    def _report_progress(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)


def _outcome(sighting: RecordedSighting) -> Outcome:
    if sighting.kind is SightingKind.DOCUMENT:
        return Outcome.PENDING
    return Outcome(sighting.kind.value)


def _log_sighting(sighting: RecordedSighting, *, retry: bool) -> None:
    if not sighting.inserted:
        return
    extra = {"uid": sighting.uid, "part": sighting.part}
    if sighting.kind is SightingKind.DUPLICATE:
        log.info("duplicate: %s", sighting.reason, extra={"action": "duplicate_skipped", **extra})
    elif sighting.kind is SightingKind.REJECTED:
        log.warning("rejected: %s", sighting.reason, extra={"action": "pdf_rejected", **extra})
    elif sighting.kind is SightingKind.ERROR:
        log.warning("error: %s", sighting.reason, extra={"action": "pdf_error", **extra})
    elif sighting.kind is SightingKind.DOCUMENT:
        log.info("new invoice recorded", extra={"action": "pdf_recorded", **extra})
