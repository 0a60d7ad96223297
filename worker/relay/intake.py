"""Reading mail: from new UIDs to one MailRecord per mail, every part decided.

Infrastructure errors propagate (the poll ends and nothing of the batch is
recorded); anything else that goes wrong with one mail becomes that mail's
`error` row, through the relay's one broad catch (`worker.relay.permail`).
The steps on one mail's parts are `worker.relay.mailparts`; this module plans
the batch: what to fetch, in which round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

from worker.mail import mime
from worker.mail.batches import size_batches
from worker.mail.proof import SenderProof
from worker.mail.ranged import RangedFetch
from worker.mail.trust import (
    DkimVerifier,
    Proof,
    TxtLookup,
)
from worker.mail.verdicts import (
    estimated_decoded_size,
    vanished_part,
)
from worker.models import (
    Candidate,
    MailHeaders,
    MailRecord,
    MailSummary,
    PartRecord,
    SightingKind,
)
from worker.relay.mailparts import (
    IntakeRules,
    MailPlan,
    decode_parts,
    is_large,
    parts_of,
    plan_mail,
    probed_pdfs,
    sized,
)
from worker.relay.permail import guarded, per_mail, proof_guard
from worker.relay.ports import Inspector, Mailbox
from worker.relay.reportcache import ReportCache

log = logging.getLogger(__name__)


@runtime_checkable
class Prestartable(Protocol):
    """An inspector whose workers can be started ahead of the first check."""

    def prestart(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedBatch:
    """What `Intake.fetch` read of one batch, waiting for `Intake.decide`."""

    plans: list[MailPlan]
    to_fetch: dict[int, list[Candidate]]  # the PDF parts fetched, per UID
    decoded: dict[tuple[int, str], bytes | Exception]  # (uid, section): the part's bytes
    vanished: tuple[int, ...] = ()  # UIDs listed by SEARCH that FETCH no longer described
    uids: tuple[int, ...] = ()  # the UIDs this batch covers (read, or vanished)
    # Past the byte budget: the UIDs left for the next batch, and their summaries.
    rest: tuple[int, ...] = ()
    rest_summaries: tuple[MailSummary, ...] = ()


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
                partial(plan_mail, summary, self._config),
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
            plan.summary.uid: guarded(plan, partial(probed_pdfs, plan, prefixes), list[Candidate]())
            for plan in plans
        }
        in_hand = self._require_proof(plans, chosen)
        to_fetch: dict[int, list[Candidate]] = {}
        limit = self._config.max_pdf_bytes
        for plan in plans:
            step = partial(sized, plan, chosen[plan.summary.uid], limit)
            wanted_parts = guarded(plan, step, list[Candidate]())
            if wanted_parts:
                to_fetch[plan.summary.uid] = wanted_parts
        # A large part comes range by range from a mailbox that can (worker.mail.ranged).
        ranging = self._mailbox if isinstance(self._mailbox, RangedFetch) else None

        def ranged(uid: int, candidate: Candidate) -> bool:
            return (
                ranging is not None
                and is_large(candidate)
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
            parts = guarded(
                by_uid[uid], partial(decode_parts, uid, cands, bodies, ranging, cut), None
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
                partial(parts_of, plan, to_fetch.get(uid, []), decoded, reports),
                _as_parts,
            )
            records.append(MailRecord(uid=uid, headers=plan.summary.headers, parts=tuple(parts)))
        records.extend(
            MailRecord(uid=uid, headers=MailHeaders(), parts=(vanished_part(),))
            for uid in batch.vanished
        )
        return sorted(records, key=lambda record: record.uid)

    def _require_proof(
        self, plans: Sequence[MailPlan], chosen: dict[int, list[Candidate]]
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
            [plan.summary for plan in wanting], guard=proof_guard, keep=keep
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


def _failed_plan(summary: MailSummary, error: PartRecord) -> MailPlan:
    return MailPlan(summary=summary, verdict=error)


def _nothing_cut(error: PartRecord) -> dict[str, bytes]:
    del error  # logged by per_mail; the parts are fetched instead
    return {}


def _as_parts(error: PartRecord) -> list[PartRecord]:
    return [error]
