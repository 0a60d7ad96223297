"""One poll: new mail to recorded, claimed, forwarded.

The pipeline sees the outside world only through the Protocols in `worker.ports`.
Order matters for the guarantees: every PDF of a mail is recorded (with its bytes)
before the mailbox position moves past the mail, a document is leased before it is
sent and marked forwarded only after the SMTP server accepted it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from worker import mime
from worker.errors import InfrastructureError, PdfCheckFailed, SendRejected, SessionRefused
from worker.models import (
    Candidate,
    DedupMode,
    DocumentState,
    MailRecord,
    MailSummary,
    Outcome,
    PartRecord,
    PdfReport,
    PollReport,
    RecordedSighting,
    SightingKind,
)
from worker.outbox import SendPacer, build_forward
from worker.ports import Inspector, Mailbox, Outbox, Store
from worker.retry import out_of_attempts, retry_delay

log = logging.getLogger(__name__)

PROBE_BYTES = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    mailbox: str  # the audit's name for the polled folder: "user@host/folder"
    forward_to: str
    forward_from: str
    since: date | None = None
    dedup: DedupMode = DedupMode.CONTENT
    keep_pdfs: bool = False
    allowed_senders: tuple[str, ...] = ()
    max_mail_bytes: int = 50_000_000
    max_pdf_bytes: int = 30_000_000
    max_attempts: int = 10
    error_retries: int = 3
    lease_seconds: float = 3600.0
    batch_size: int = 200
    send_batch: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedSighting:
    """What a dry run would record for one part."""

    uid: int
    part: str
    kind: SightingKind
    reason: str | None
    filename: str | None
    sha256: str | None


@dataclass(slots=True)
class _MailPlan:
    """Per-mail working state inside one batch."""

    summary: MailSummary
    verdict: PartRecord | None = None  # a mail-level outcome decided before fetching
    rejected_parts: list[PartRecord] = field(default_factory=list)
    certain: list[Candidate] = field(default_factory=list)
    probed: list[Candidate] = field(default_factory=list)


def sender_allowed(address: str, allowed: Sequence[str]) -> bool:
    """Whether `address` matches the allowlist (empty allowlist: anyone)."""
    if not allowed:
        return True
    if not address:
        return False
    domain = "@" + address.rpartition("@")[2]
    return address in allowed or domain in allowed


def loop_reason(summary: MailSummary, forward_from: str) -> str | None:
    """Why this mail is our own forwarded mail coming back, or None."""
    headers = summary.headers
    if headers.relay_marker is not None:
        return "loop: carries the X-Invoice-Relay header of a forwarded mail"
    auto = (headers.auto_submitted or "").strip().lower()
    if auto and auto != "no" and headers.sender_address == forward_from.lower():
        return "loop: Auto-Submitted mail from INVOICE_RELAY_FORWARD_FROM"
    return None


def estimated_decoded_size(candidate: Candidate) -> int:
    if candidate.encoding == "base64":
        return candidate.size * 3 // 4
    return candidate.size


class Pipeline:
    """Polls one mailbox and forwards what is new. Build a new one per configuration."""

    def __init__(
        self,
        *,
        config: PipelineConfig,
        mailbox: Mailbox,
        outbox: Outbox,
        store: Store,
        inspector: Inspector,
        pacer: SendPacer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        stop: threading.Event | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._mailbox = mailbox
        self._outbox = outbox
        self._store = store
        self._inspector = inspector
        self._pacer = pacer or SendPacer(None)
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._stop = stop or threading.Event()
        self._progress = progress

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
        status = self._mailbox.open()
        try:
            position = self._store.position(config.mailbox)
            last_uid = 0
            if position is not None and position.uidvalidity == status.uidvalidity:
                last_uid = position.last_uid
            else:
                rescanned = position is not None
                if rescanned:
                    log.warning(
                        "UIDVALIDITY changed from %s to %s: reading the folder again",
                        position.uidvalidity if position else None,
                        status.uidvalidity,
                        extra={"action": "uidvalidity_changed", "mailbox": config.mailbox},
                    )
                self._store.reset_position(config.mailbox, status.uidvalidity)
            # UIDNEXT says whether anything is new without listing the folder.
            if status.uidnext == 0 or status.uidnext - 1 > last_uid:
                uids = self._mailbox.new_uids(last_uid, config.since)
                highest_known = max(status.uidnext - 1, 0)
                batches = list(_chunks(uids, config.batch_size)) or [[]]
                for index, batch in enumerate(batches):
                    if self._stop.is_set():
                        break
                    is_last = index == len(batches) - 1
                    advance_to = max([*batch, highest_known if is_last else 0, last_uid])
                    recorded = self._process(
                        status.uidvalidity, batch, advance_to=advance_to, retry=False
                    )
                    mails_seen += len({r.uid for r in recorded})
                    sightings.update(_outcome(r) for r in recorded if r.inserted)
                    self._report_progress(f"{mails_seen} of {len(uids)} new mails read")
            if not self._stop.is_set():
                sightings.update(self._retry_errors(status.uidvalidity))
        finally:
            self._mailbox.close()
        forwarded, retried, failed = self._forward_due()
        counts = self._store.state_counts()
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
        )
        log.info(
            "poll finished: %s mails read, %s forwarded, %s pending",
            mails_seen,
            forwarded,
            report.pending,
            extra={"action": "poll_finished", "mailbox": config.mailbox},
        )
        return report

    def plan(self) -> list[PlannedSighting]:
        """A dry run: what a poll would record now, without writing or sending anything."""
        status = self._mailbox.open()
        try:
            position = self._store.position(self._config.mailbox)
            last_uid = 0
            if position is not None and position.uidvalidity == status.uidvalidity:
                last_uid = position.last_uid
            planned: list[PlannedSighting] = []
            for batch in _chunks(self._mailbox.new_uids(last_uid, self._config.since), 200):
                for mail in self._build_records(batch):
                    planned.extend(self._planned(mail))
            return planned
        finally:
            self._mailbox.close()

    # --- reading mail -----------------------------------------------------------------

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
        for batch in _chunks(uids, config.batch_size):
            recorded = self._process(uidvalidity, batch, advance_to=None, retry=True)
            result.update(_outcome(r) for r in recorded if r.inserted)
        return result

    def _process(
        self, uidvalidity: int, uids: Sequence[int], *, advance_to: int | None, retry: bool
    ) -> list[RecordedSighting]:
        mails = self._build_records(uids) if uids else []
        recorded = self._store.record_mails(
            mailbox=self._config.mailbox,
            uidvalidity=uidvalidity,
            mails=mails,
            advance_to=advance_to,
            dedup=self._config.dedup,
            keep_pdfs=self._config.keep_pdfs,
            now=self._clock(),
        )
        for sighting in recorded:
            _log_sighting(sighting, retry=retry)
        return recorded

    def _build_records(self, uids: Sequence[int]) -> list[MailRecord]:
        """Fetch what is needed of `uids` and decide every part's kind. Infrastructure
        errors propagate (the poll ends, nothing of this batch is recorded); anything
        else is caught per mail and recorded as that mail's `error`."""
        plans = [self._plan_mail(summary) for summary in self._mailbox.summaries(uids)]

        probe_wanted = {p.summary.uid: [c.section for c in p.probed] for p in plans if p.probed}
        prefixes = (
            self._mailbox.fetch_sections(probe_wanted, max_bytes=PROBE_BYTES)
            if probe_wanted
            else {}
        )
        to_fetch: dict[int, list[Candidate]] = {}
        for plan in plans:
            uid = plan.summary.uid
            chosen = list(plan.certain)
            for candidate in plan.probed:
                prefix = prefixes.get((uid, candidate.section), b"")
                if mime.probe_is_pdf(prefix, candidate.encoding):
                    chosen.append(candidate)
            for candidate in sorted(chosen, key=lambda c: _section_key(c.section)):
                if estimated_decoded_size(candidate) > self._config.max_pdf_bytes:
                    plan.rejected_parts.append(_too_large(candidate, self._config.max_pdf_bytes))
                else:
                    to_fetch.setdefault(uid, []).append(candidate)
        wanted = {uid: [c.section for c in cands] for uid, cands in to_fetch.items()}
        bodies = self._mailbox.fetch_sections(wanted) if wanted else {}

        # Decode every fetched part, then check all PDFs of the batch in one go so the
        # worker processes run in parallel.
        decoded: dict[tuple[int, str], bytes | Exception] = {}
        for uid, cands in to_fetch.items():
            for candidate in cands:
                raw = bodies.get((uid, candidate.section))
                if raw is None:
                    decoded[(uid, candidate.section)] = LookupError("part vanished from the server")
                    continue
                try:
                    decoded[(uid, candidate.section)] = mime.decode_transfer(
                        raw, candidate.encoding
                    )
                except ValueError as exc:
                    decoded[(uid, candidate.section)] = exc
        files = [(key, data) for key, data in decoded.items() if isinstance(data, bytes)]
        reports = dict(
            zip(
                [key for key, _ in files],
                self._inspector.inspect_many(data for _, data in files),
                strict=True,
            )
        )

        records: list[MailRecord] = []
        for plan in plans:
            uid = plan.summary.uid
            try:
                parts = self._parts_of(plan, to_fetch.get(uid, []), decoded, reports)
            except Exception as exc:
                log.exception(
                    "could not handle mail %s",
                    uid,
                    extra={"action": "mail_error", "uid": uid},
                )
                parts = [PartRecord(part="", kind=SightingKind.ERROR, reason=_describe(exc))]
            records.append(MailRecord(uid=uid, headers=plan.summary.headers, parts=tuple(parts)))
        return records

    def _plan_mail(self, summary: MailSummary) -> _MailPlan:
        config = self._config
        plan = _MailPlan(summary=summary)
        if summary.size > config.max_mail_bytes:
            plan.verdict = PartRecord(
                part="",
                kind=SightingKind.REJECTED,
                reason=f"mail too large: {summary.size} bytes, limit {config.max_mail_bytes}"
                " (INVOICE_RELAY_MAX_MAIL_BYTES)",
                size_bytes=summary.size,
            )
            return plan
        if summary.structure is None:
            plan.verdict = PartRecord(
                part="",
                kind=SightingKind.ERROR,
                reason="the server could not describe the mail's MIME structure",
            )
            return plan
        try:
            candidates = mime.find_candidates(summary.structure)
        except Exception as exc:
            log.exception("bad structure in mail %s", summary.uid, extra={"action": "mail_error"})
            plan.verdict = PartRecord(part="", kind=SightingKind.ERROR, reason=_describe(exc))
            return plan
        refusal = loop_reason(summary, config.forward_from)
        if refusal is None and not sender_allowed(
            summary.headers.sender_address, config.allowed_senders
        ):
            shown = summary.headers.sender_address or summary.headers.sender_defect or "unknown"
            refusal = f"sender not allowed: {shown}"
        if refusal is not None:
            # Strangers' attachments are never downloaded: only labelled PDFs get a row.
            certain = [c for c in candidates if c.certain]
            plan.rejected_parts = [
                PartRecord(
                    part=c.section,
                    kind=SightingKind.REJECTED,
                    reason=refusal,
                    filename=c.filename,
                    size_bytes=estimated_decoded_size(c),
                )
                for c in certain
            ]
            if not certain:
                plan.verdict = PartRecord(part="", kind=SightingKind.REJECTED, reason=refusal)
            return plan
        plan.certain = [c for c in candidates if c.certain]
        plan.probed = [c for c in candidates if not c.certain]
        return plan

    def _parts_of(
        self,
        plan: _MailPlan,
        fetched: Sequence[Candidate],
        decoded: Mapping[tuple[int, str], bytes | Exception],
        reports: Mapping[tuple[int, str], PdfReport | Exception],
    ) -> list[PartRecord]:
        if plan.verdict is not None:
            return [plan.verdict]
        uid = plan.summary.uid
        parts = list(plan.rejected_parts)
        for candidate in fetched:
            key = (uid, candidate.section)
            data = decoded[key]
            filename = candidate.filename or f"invoice-{uid}-{candidate.section}.pdf"
            if isinstance(data, Exception):
                kind = (
                    SightingKind.ERROR if isinstance(data, LookupError) else SightingKind.REJECTED
                )
                parts.append(
                    PartRecord(
                        part=candidate.section,
                        kind=kind,
                        reason=f"cannot decode the part: {data}",
                        filename=filename,
                    )
                )
                continue
            parts.append(_checked_part(candidate.section, filename, data, reports[key]))
        if not parts:
            parts.append(PartRecord(part="", kind=SightingKind.NO_PDF))
        return sorted(parts, key=lambda p: _section_key(p.part))

    def _planned(self, mail: MailRecord) -> Iterator[PlannedSighting]:
        for part in mail.parts:
            yield PlannedSighting(
                uid=mail.uid,
                part=part.part,
                kind=part.kind,
                reason=part.reason,
                filename=part.filename,
                sha256=part.sha256,
            )

    # --- forwarding -------------------------------------------------------------------

    def _forward_due(self) -> tuple[int, int, int]:
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


def _checked_part(
    section: str, filename: str, data: bytes, report: PdfReport | Exception
) -> PartRecord:
    sha256 = hashlib.sha256(data).hexdigest()
    reason: str | None
    if isinstance(report, Exception):
        reason = (
            f"PDF check failed: {report}"
            if isinstance(report, PdfCheckFailed)
            else _describe(report)
        )
        kind = SightingKind.ERROR
    elif not report.accepted:
        kind, reason = SightingKind.REJECTED, report.reason
    else:
        return PartRecord(
            part=section,
            kind=SightingKind.DOCUMENT,
            reason=report.fingerprint_note,
            filename=filename,
            size_bytes=len(data),
            sha256=sha256,
            fingerprint=report.fingerprint,
            invoice_number=report.invoice_number,
            content=data,
        )
    return PartRecord(
        part=section,
        kind=kind,
        reason=reason,
        filename=filename,
        size_bytes=len(data),
        sha256=sha256,
    )


def _too_large(candidate: Candidate, limit: int) -> PartRecord:
    return PartRecord(
        part=candidate.section,
        kind=SightingKind.REJECTED,
        reason=f"PDF too large: about {estimated_decoded_size(candidate)} bytes, limit {limit}"
        " (INVOICE_RELAY_MAX_PDF_BYTES)",
        filename=candidate.filename,
        size_bytes=estimated_decoded_size(candidate),
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _section_key(section: str) -> tuple[int, ...]:
    return tuple(int(piece) for piece in section.split(".") if piece.isdigit())


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


__all__ = [
    "InfrastructureError",
    "Pipeline",
    "PipelineConfig",
    "PlannedSighting",
    "loop_reason",
    "sender_allowed",
]
