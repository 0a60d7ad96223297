"""Reading mail: from new UIDs to one MailRecord per mail, every part decided.

Infrastructure errors propagate (the poll ends and nothing of the batch is
recorded); anything else that goes wrong with one mail becomes that mail's
`error` row: the one broad catch of the relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar, runtime_checkable

from worker.errors import InfrastructureError
from worker.mail import mime
from worker.mail.ranged import LARGE_PART, RangedFetch, fetch_decoded
from worker.mail.trust import NO_PROOF, DkimVerifier, Proof, SenderProof, TrustPolicy, TxtLookup
from worker.mail.verdicts import (
    checked_part,
    describe,
    estimated_decoded_size,
    loop_code,
    loop_reason,
    section_key,
    sender_allowed,
    too_large,
)
from worker.models import (
    Candidate,
    MailRecord,
    MailSummary,
    PartRecord,
    PdfReport,
    SightingKind,
)
from worker.relay.ports import Inspector, Mailbox
from worker.relay.reportcache import ReportCache

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakeRules:
    """What decides, before any download, whether a mail's parts are wanted."""

    forward_from: str
    allowed_senders: tuple[str, ...] = ()
    max_mail_bytes: int = 50_000_000
    max_pdf_bytes: int = 30_000_000
    max_parts: int = 100  # MIME parts per mail, containers included
    max_depth: int = 10  # MIME nesting levels
    trust: TrustPolicy = NO_PROOF  # proof of the From header (worker.mail.trust)


@dataclass(slots=True)
class _MailPlan:
    """Per-mail working state inside one batch."""

    summary: MailSummary
    verdict: PartRecord | None = None  # a mail-level outcome decided before fetching
    rejected_parts: list[PartRecord] = field(default_factory=list)
    certain: list[Candidate] = field(default_factory=list)
    probed: list[Candidate] = field(default_factory=list)


@runtime_checkable
class Prestartable(Protocol):
    """An inspector whose workers can be started ahead of the first check."""

    def prestart(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedBatch:
    """What `Intake.fetch` read of one batch, waiting for `Intake.decide`."""

    plans: list[_MailPlan]
    to_fetch: dict[int, list[Candidate]]  # the PDF parts fetched, per UID
    decoded: dict[tuple[int, str], bytes | Exception]  # (uid, section): the part's bytes


def _large(candidate: Candidate) -> bool:
    return candidate.encoding.strip().lower() == "base64" and candidate.size >= LARGE_PART


class Intake:
    """Turns UIDs into MailRecords: BODYSTRUCTURE first, probes, then PDF parts only."""

    def __init__(
        self,
        *,
        rules: IntakeRules,
        mailbox: Mailbox,
        inspector: Inspector,
        txt_lookup: TxtLookup | None = None,  # DNS for DKIM keys; None: the real one
    ) -> None:
        self._config = rules
        self._mailbox = mailbox
        self._inspector = inspector
        self._proof = SenderProof(
            policy=rules.trust,
            mailbox=mailbox,
            verifier=DkimVerifier(lookup=txt_lookup),
            batch_bytes=rules.max_mail_bytes,
        )
        self._reports = ReportCache(inspector)  # resends are not checked again

    def build_records(self, uids: Sequence[int]) -> list[MailRecord]:
        """Fetch what is needed of `uids` and decide every part's kind. Infrastructure
        errors propagate (the poll ends, nothing of this batch is recorded); anything
        else is caught per mail and recorded as that mail's `error`."""
        return self.decide(self.fetch(uids))

    def prestart(self) -> None:
        """New mail is coming: let an inspector that can start its workers do so now."""
        if isinstance(self._inspector, Prestartable):
            self._inspector.prestart()

    def fetch(self, uids: Sequence[int]) -> FetchedBatch:
        """The IMAP half of `build_records`: summaries, probes, sender proof and the PDF
        parts, decoded. Uses the mailbox and nothing else, so a poll may run it for the
        next batch in a thread of its own while `decide` checks this one."""
        if not uids:
            return FetchedBatch(plans=[], to_fetch={}, decoded={})
        plans = [
            per_mail(
                summary.uid,
                partial(self._plan_mail, summary),
                partial(_failed_plan, summary),
            )
            for summary in self._mailbox.summaries(uids)
        ]

        probe_wanted = {p.summary.uid: [c.section for c in p.probed] for p in plans if p.probed}
        prefixes = (
            self._mailbox.fetch_sections(probe_wanted, max_bytes=mime.PROBE_OCTETS)
            if probe_wanted
            else {}
        )
        chosen: dict[int, list[Candidate]] = {}
        for plan in plans:
            uid = plan.summary.uid
            chosen[uid] = list(plan.certain)
            for candidate in plan.probed:
                prefix = prefixes.get((uid, candidate.section), b"")
                if mime.probe_is_pdf(prefix, candidate.encoding):
                    chosen[uid].append(candidate)
        self._require_proof(plans, chosen)
        to_fetch: dict[int, list[Candidate]] = {}
        for plan in plans:
            uid = plan.summary.uid
            for candidate in sorted(chosen[uid], key=lambda c: section_key(c.section)):
                if estimated_decoded_size(candidate) > self._config.max_pdf_bytes:
                    plan.rejected_parts.append(too_large(candidate, self._config.max_pdf_bytes))
                else:
                    to_fetch.setdefault(uid, []).append(candidate)
        # A large part comes range by range from a mailbox that can (worker.mail.ranged).
        ranging = self._mailbox if isinstance(self._mailbox, RangedFetch) else None
        wanted = {
            uid: [c.section for c in cands if not (ranging is not None and _large(c))]
            for uid, cands in to_fetch.items()
        }
        bodies = self._mailbox.fetch_sections(wanted) if any(wanted.values()) else {}

        # Decode every fetched part; `decide` checks them.
        decoded: dict[tuple[int, str], bytes | Exception] = {}
        for uid, cands in to_fetch.items():
            for candidate in cands:
                if ranging is not None and _large(candidate):
                    try:
                        large = fetch_decoded(ranging, uid, candidate.section)
                    except ValueError as exc:
                        decoded[(uid, candidate.section)] = exc
                        continue
                    decoded[(uid, candidate.section)] = (
                        LookupError("part vanished from the server") if large is None else large
                    )
                    continue
                # Popped: each raw part is freed once decoded.
                raw = bodies.pop((uid, candidate.section), None)
                if raw is None:
                    decoded[(uid, candidate.section)] = LookupError("part vanished from the server")
                    continue
                try:
                    decoded[(uid, candidate.section)] = mime.decode_transfer(
                        raw, candidate.encoding
                    )
                except ValueError as exc:
                    decoded[(uid, candidate.section)] = exc
        return FetchedBatch(plans=plans, to_fetch=to_fetch, decoded=decoded)

    def decide(self, batch: FetchedBatch) -> list[MailRecord]:
        """The PDF half of `build_records`: checks every fetched PDF of the batch in one
        go (the worker processes run in parallel) and builds one MailRecord per mail.
        Uses the inspector only, never the mailbox."""
        plans, to_fetch, decoded = batch.plans, batch.to_fetch, batch.decoded
        reports = self._reports.check(
            {key: data for key, data in decoded.items() if isinstance(data, bytes)}
        )

        records: list[MailRecord] = []
        for plan in plans:
            uid = plan.summary.uid
            parts = per_mail(
                uid,
                partial(self._parts_of, plan, to_fetch.get(uid, []), decoded, reports),
                _as_parts,
            )
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
            # What the server says of a mail's structure does not change, so a structure
            # the relay cannot read (hostile nesting, say) is rejected at once; only a
            # mail the server did not describe at all is an error worth retrying.
            problem = summary.structure_problem
            plan.verdict = PartRecord(
                part="",
                kind=SightingKind.REJECTED if problem else SightingKind.ERROR,
                reason=f"unreadable MIME structure: {problem}"
                if problem
                else "the server could not describe the mail's MIME structure",
            )
            return plan
        limit = mime.structure_limit(
            summary.structure, max_parts=config.max_parts, max_depth=config.max_depth
        )
        if limit is not None:
            plan.verdict = PartRecord(part="", kind=SightingKind.REJECTED, reason=limit)
            return plan
        candidates = mime.find_candidates(summary.structure)
        refusal = loop_reason(summary, config.forward_from)
        refusal_code = loop_code(summary)
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
                    reason_code=refusal_code,
                    filename=c.filename,
                    size_bytes=estimated_decoded_size(c),
                )
                for c in certain
            ]
            if not certain:
                plan.verdict = PartRecord(
                    part="", kind=SightingKind.REJECTED, reason=refusal, reason_code=refusal_code
                )
            return plan
        plan.certain = [c for c in candidates if c.certain]
        plan.probed = [c for c in candidates if not c.certain]
        return plan

    def _require_proof(
        self, plans: Sequence[_MailPlan], chosen: dict[int, list[Candidate]]
    ) -> None:
        """Mails with PDFs must prove their From when the TrustPolicy says so: unproven,
        their PDFs are rejected (never fetched); unsure (DNS timeout), the mail is an
        error tried again later."""
        wanting = [plan for plan in plans if chosen[plan.summary.uid]]
        verdicts = self._proof.check([plan.summary for plan in wanting])
        for plan in wanting:
            uid = plan.summary.uid
            verdict = verdicts.get(uid)
            if verdict is None or verdict.proof is Proof.PASSED:
                continue
            if verdict.proof is Proof.UNSURE:
                plan.verdict = PartRecord(part="", kind=SightingKind.ERROR, reason=verdict.reason)
            else:
                plan.rejected_parts.extend(
                    PartRecord(
                        part=c.section,
                        kind=SightingKind.REJECTED,
                        reason=verdict.reason,
                        filename=c.filename,
                        size_bytes=estimated_decoded_size(c),
                    )
                    for c in chosen[uid]
                )
            chosen[uid] = []

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
            parts.append(checked_part(candidate.section, filename, data, reports[key]))
        if not parts:
            parts.append(PartRecord(part="", kind=SightingKind.NO_PDF))
        return sorted(parts, key=lambda p: section_key(p.part))


def _failed_plan(summary: MailSummary, error: PartRecord) -> _MailPlan:
    return _MailPlan(summary=summary, verdict=error)


def _as_parts(error: PartRecord) -> list[PartRecord]:
    return [error]


def per_mail(uid: int, step: Callable[[], _T], on_error: Callable[[PartRecord], _T]) -> _T:
    """The relay's one broad catch: whatever goes wrong with one mail (a bug, a parser
    surprise) becomes that mail's `error` row, logged with its traceback, and the poll
    goes on. A server or the database failing is not the mail's fault: that ends the
    poll, and nothing of the batch is recorded."""
    try:
        return step()
    except InfrastructureError:
        raise
    except Exception as exc:  # recorded as the mail's error, with the traceback logged
        log.exception("could not handle mail %s", uid, extra={"action": "mail_error", "uid": uid})
        return on_error(PartRecord(part="", kind=SightingKind.ERROR, reason=describe(exc)))
