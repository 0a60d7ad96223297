"""Reading mail: from new UIDs to one MailRecord per mail, every part decided.

Infrastructure errors propagate (the poll ends and nothing of the batch is
recorded); anything else that goes wrong with one mail becomes that mail's
`error` row: the one broad catch of the relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar, runtime_checkable

from worker.errors import InfrastructureError
from worker.mail import mime, transfer
from worker.mail.batches import size_batches
from worker.mail.proof import SenderProof
from worker.mail.ranged import LARGE_PART, RangedFetch, fetch_decoded
from worker.mail.trust import (
    NO_PROOF,
    DkimVerifier,
    Proof,
    TrustPolicy,
    TrustVerdict,
    TxtLookup,
)
from worker.mail.verdicts import (
    checked_part,
    describe,
    estimated_decoded_size,
    loop_code,
    loop_reason,
    section_key,
    sender_allowed,
    too_large,
    vanished_part,
)
from worker.models import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MAIL_BYTES,
    DEFAULT_MAX_PARTS,
    DEFAULT_MAX_PDF_BYTES,
    Candidate,
    MailHeaders,
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
    max_mail_bytes: int = DEFAULT_MAX_MAIL_BYTES
    max_pdf_bytes: int = DEFAULT_MAX_PDF_BYTES
    max_parts: int = DEFAULT_MAX_PARTS  # MIME parts per mail, containers included
    max_depth: int = DEFAULT_MAX_DEPTH  # MIME nesting levels
    trust: TrustPolicy = NO_PROOF  # proof of the From header (worker.mail.trust)
    # RFC822.SIZE of the mails one batch reads (at least one mail): what it holds in
    # memory and writes in one transaction. A poll holds two: one checked, one fetched.
    batch_bytes: int = DEFAULT_BATCH_BYTES


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
    vanished: tuple[int, ...] = ()  # UIDs listed by SEARCH that FETCH no longer described
    uids: tuple[int, ...] = ()  # the UIDs this batch covers (read, or vanished)
    # Past the byte budget: the UIDs left for the next batch, and their summaries.
    rest: tuple[int, ...] = ()
    rest_summaries: tuple[MailSummary, ...] = ()


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
        return [record for batch in self.record_batches(uids) for record in batch]

    def record_batches(self, uids: Sequence[int]) -> Iterator[list[MailRecord]]:
        """`build_records` one byte-bounded batch at a time: record each before asking
        for the next, and no more than one batch's PDFs are held."""
        batch = self.fetch(uids)
        while True:
            rest, described = batch.rest, batch.rest_summaries
            records = self.decide(batch)
            del batch  # its PDFs live on in `records` only, for the caller to drop
            yield records
            del records
            if not rest:
                return
            batch = self.fetch(rest, described=described)

    def prestart(self) -> None:
        """New mail is coming: let an inspector that can start its workers do so now."""
        if isinstance(self._inspector, Prestartable):
            self._inspector.prestart()

    def fetch(
        self, uids: Sequence[int], *, described: Sequence[MailSummary] | None = None
    ) -> FetchedBatch:
        """The IMAP half of `build_records`: summaries, probes, sender proof and the PDF
        parts, decoded. Uses the mailbox and nothing else, so a poll may run it for the
        next batch in a thread of its own while `decide` checks this one. The server's
        answers come batched; every decision on one mail runs under `per_mail`.

        Only the first mails that fit `IntakeRules.batch_bytes` are read; the batch's
        `rest` (with `rest_summaries`, so they are not asked for again) is for the next
        call. `described`: the summaries of `uids`, when a previous batch has them."""
        if not uids:
            return FetchedBatch(plans=[], to_fetch={}, decoded={})
        uids = sorted(uids)
        summaries = sorted(
            self._mailbox.summaries(uids) if described is None else described,
            key=lambda summary: summary.uid,
        )
        rest: tuple[int, ...] = ()
        rest_summaries: tuple[MailSummary, ...] = ()
        [taken, *_] = size_batches(
            [self._held(summary) for summary in summaries], max_bytes=self._config.batch_bytes
        ) or [0]
        if taken < len(summaries):
            first_left = summaries[taken].uid
            rest = tuple(uid for uid in uids if uid >= first_left)
            rest_summaries = tuple(summaries[taken:])
            uids = [uid for uid in uids if uid < first_left]
            summaries = summaries[:taken]
        seen = {summary.uid for summary in summaries}
        vanished = tuple(uid for uid in uids if uid not in seen)
        for uid in vanished:
            log.info(
                "mail %s vanished between SEARCH and FETCH",
                uid,
                extra={"action": "mail_vanished", "uid": uid},
            )
        plans = [
            per_mail(
                summary.uid,
                partial(self._plan_mail, summary),
                partial(_failed_plan, summary),
            )
            for summary in summaries
        ]

        probe_wanted = {p.summary.uid: [c.section for c in p.probed] for p in plans if p.probed}
        prefixes = (
            self._mailbox.fetch_sections(probe_wanted, max_bytes=mime.PROBE_OCTETS)
            if probe_wanted
            else {}
        )
        chosen = {
            plan.summary.uid: _guarded(
                plan, partial(_probed_pdfs, plan, prefixes), list[Candidate]()
            )
            for plan in plans
        }
        in_hand = self._require_proof(plans, chosen)
        to_fetch: dict[int, list[Candidate]] = {}
        for plan in plans:
            wanted_parts = _guarded(
                plan, partial(self._sized, plan, chosen[plan.summary.uid]), list[Candidate]()
            )
            if wanted_parts:
                to_fetch[plan.summary.uid] = wanted_parts
        # A large part comes range by range from a mailbox that can (worker.mail.ranged).
        ranging = self._mailbox if isinstance(self._mailbox, RangedFetch) else None

        def ranged(uid: int, candidate: Candidate) -> bool:
            return (
                ranging is not None
                and _large(candidate)
                and (uid, candidate.section) not in in_hand
            )

        # Parts cut from a mail fetched whole for DKIM are not downloaded again.
        wanted = {
            uid: [
                c.section for c in cands if not ranged(uid, c) and (uid, c.section) not in in_hand
            ]
            for uid, cands in to_fetch.items()
        }
        bodies = self._mailbox.fetch_sections(wanted) if any(wanted.values()) else {}
        cut = frozenset(in_hand)  # cut from a whole mail: never fetched in ranges
        bodies.update(in_hand)
        in_hand.clear()

        # Decode every fetched part; `decide` checks them.
        decoded: dict[tuple[int, str], bytes | Exception] = {}
        by_uid = {plan.summary.uid: plan for plan in plans}
        for uid, cands in list(to_fetch.items()):
            parts = _guarded(
                by_uid[uid], partial(_decode_parts, uid, cands, bodies, ranging, cut), None
            )
            if parts is None:
                del to_fetch[uid]  # the mail's error row says why
                continue
            decoded.update(parts)
        return FetchedBatch(
            plans=plans,
            to_fetch=to_fetch,
            decoded=decoded,
            vanished=vanished,
            uids=tuple(uids),
            rest=rest,
            rest_summaries=rest_summaries,
        )

    def _held(self, summary: MailSummary) -> int:
        """What reading a mail may hold: its size, or nothing for one too large to read."""
        return 0 if summary.size > self._config.max_mail_bytes else summary.size

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
        records.extend(
            MailRecord(uid=uid, headers=MailHeaders(), parts=(vanished_part(),))
            for uid in batch.vanished
        )
        return sorted(records, key=lambda record: record.uid)

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
    ) -> dict[tuple[int, str], bytes]:
        """Mails with PDFs must prove their From when the TrustPolicy says so: unproven,
        their PDFs are rejected (never fetched); unsure (DNS timeout), the mail is an
        error tried again later. Returns the raw PDF parts of the mails that proved it
        by DKIM, cut from the whole mail it fetched, by (uid, section)."""
        wanting = [plan for plan in plans if chosen[plan.summary.uid]]
        in_hand: dict[tuple[int, str], bytes] = {}

        def keep(uid: int, raw: bytes) -> None:
            # Cut at once: only the parts outlive the whole mail. Should cutting fail,
            # the parts are fetched from the server as they would be without DKIM.
            sizes = {c.section: c.size for c in chosen.get(uid, [])}
            cut = per_mail(uid, partial(mime.section_bodies, raw, sizes), _nothing_cut)
            for section, body in cut.items():
                in_hand[(uid, section)] = body

        verdicts = self._proof.check(
            [plan.summary for plan in wanting], guard=_proof_guard, keep=keep
        )
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
        return in_hand

    def _sized(self, plan: _MailPlan, chosen: Sequence[Candidate]) -> list[Candidate]:
        """The chosen parts worth fetching; those too large become rejected rows."""
        limit = self._config.max_pdf_bytes
        wanted: list[Candidate] = []
        for candidate in sorted(chosen, key=lambda c: section_key(c.section)):
            if estimated_decoded_size(candidate) > limit:
                plan.rejected_parts.append(too_large(candidate, limit))
            else:
                wanted.append(candidate)
        return wanted

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


def _probed_pdfs(plan: _MailPlan, prefixes: Mapping[tuple[int, str], bytes]) -> list[Candidate]:
    """The labelled PDF parts, and the unlabelled ones whose first bytes are a PDF's."""
    uid = plan.summary.uid
    found = list(plan.certain)
    for candidate in plan.probed:
        prefix = prefixes.get((uid, candidate.section), b"")
        if transfer.probe_is_pdf(prefix, candidate.encoding):
            found.append(candidate)
    return found


def _decode_parts(
    uid: int,
    candidates: Sequence[Candidate],
    bodies: dict[tuple[int, str], bytes],
    ranging: RangedFetch | None,
    cut: frozenset[tuple[int, str]] = frozenset(),
) -> dict[tuple[int, str], bytes | Exception]:
    """One mail's PDF parts, transfer-decoded; an undecodable part's value is the error.
    Parts in `cut` are in `bodies` already (cut from a whole mail), whatever their size."""
    decoded: dict[tuple[int, str], bytes | Exception] = {}
    for candidate in candidates:
        key = (uid, candidate.section)
        if ranging is not None and _large(candidate) and key not in cut:
            try:
                large = fetch_decoded(ranging, uid, candidate.section)
            except ValueError as exc:
                decoded[key] = exc
                continue
            decoded[key] = LookupError("part vanished from the server") if large is None else large
            continue
        # Popped: each raw part is freed once decoded.
        raw = bodies.pop(key, None)
        if raw is None:
            decoded[key] = LookupError("part vanished from the server")
            continue
        try:
            decoded[key] = transfer.decode_transfer(raw, candidate.encoding)
        except ValueError as exc:
            decoded[key] = exc
    return decoded


def _guarded(plan: _MailPlan, step: Callable[[], _T], fallback: _T) -> _T:
    """`per_mail` for one step of a planned mail: should the step raise, the mail's
    verdict becomes that error (its later steps then have nothing to do) and the step
    yields `fallback`."""

    def failed(error: PartRecord) -> _T:
        plan.verdict = error
        plan.rejected_parts.clear()
        return fallback

    return per_mail(plan.summary.uid, step, failed)


def _proof_guard(uid: int, step: Callable[[], TrustVerdict]) -> TrustVerdict:
    """A proof step that raised leaves the sender unproven for now: the mail is an
    `error`, tried again on a later poll (and `rejected` after a few tries)."""
    return per_mail(uid, step, _unsure)


def _unsure(error: PartRecord) -> TrustVerdict:
    return TrustVerdict(proof=Proof.UNSURE, reason=f"sender proof crashed: {error.reason}")


def _failed_plan(summary: MailSummary, error: PartRecord) -> _MailPlan:
    return _MailPlan(summary=summary, verdict=error)


def _nothing_cut(error: PartRecord) -> dict[str, bytes]:
    del error  # logged by per_mail; the parts are fetched instead
    return {}


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
