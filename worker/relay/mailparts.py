"""One mail's parts, step by step: the rules, the plan a mail gets from its
BODYSTRUCTURE, the probe's choice of PDFs, the size limit, transfer decoding and
the final rows.

Helpers of `worker.relay.intake` without its batching: each takes one mail and what
the server answered for it. `worker.relay.permail` guards every call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from worker.mail import mime, transfer
from worker.mail.ranged import LARGE_PART, RangedFetch, fetch_decoded
from worker.mail.trust import NO_PROOF, TrustPolicy
from worker.mail.verdicts import (
    checked_part,
    estimated_decoded_size,
    loop_code,
    loop_reason,
    section_key,
    sender_allowed,
    too_large,
)
from worker.models import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MAIL_BYTES,
    DEFAULT_MAX_PARTS,
    DEFAULT_MAX_PDF_BYTES,
    Candidate,
    MailSummary,
    PartRecord,
    PdfReport,
    SightingKind,
)


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
class MailPlan:
    """Per-mail working state inside one batch."""

    summary: MailSummary
    verdict: PartRecord | None = None  # a mail-level outcome decided before fetching
    rejected_parts: list[PartRecord] = field(default_factory=list)
    certain: list[Candidate] = field(default_factory=list)
    probed: list[Candidate] = field(default_factory=list)


def plan_mail(summary: MailSummary, config: IntakeRules) -> MailPlan:
    """What the BODYSTRUCTURE and headers decide before any download: a verdict for
    the whole mail, rejected rows, or the candidates to fetch and to probe."""
    plan = MailPlan(summary=summary)
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


def is_large(candidate: Candidate) -> bool:
    return candidate.encoding.strip().lower() == "base64" and candidate.size >= LARGE_PART


def sized(plan: MailPlan, chosen: Sequence[Candidate], limit: int) -> list[Candidate]:
    """The chosen parts worth fetching; those over `limit` become rejected rows."""
    wanted: list[Candidate] = []
    for candidate in sorted(chosen, key=lambda c: section_key(c.section)):
        if estimated_decoded_size(candidate) > limit:
            plan.rejected_parts.append(too_large(candidate, limit))
        else:
            wanted.append(candidate)
    return wanted


def parts_of(
    plan: MailPlan,
    fetched: Sequence[Candidate],
    decoded: Mapping[tuple[int, str], bytes | Exception],
    reports: Mapping[tuple[int, str], PdfReport | Exception],
) -> list[PartRecord]:
    """One mail's rows: its verdict, or its rejected parts and every fetched part
    checked (`decoded` and `reports` by (uid, section))."""
    if plan.verdict is not None:
        return [plan.verdict]
    uid = plan.summary.uid
    parts = list(plan.rejected_parts)
    for candidate in fetched:
        key = (uid, candidate.section)
        data = decoded[key]
        filename = candidate.filename or f"invoice-{uid}-{candidate.section}.pdf"
        if isinstance(data, Exception):
            kind = SightingKind.ERROR if isinstance(data, LookupError) else SightingKind.REJECTED
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


def probed_pdfs(plan: MailPlan, prefixes: Mapping[tuple[int, str], bytes]) -> list[Candidate]:
    """The labelled PDF parts, and the unlabelled ones whose first bytes are a PDF's."""
    uid = plan.summary.uid
    found = list(plan.certain)
    for candidate in plan.probed:
        prefix = prefixes.get((uid, candidate.section), b"")
        if transfer.probe_is_pdf(prefix, candidate.encoding):
            found.append(candidate)
    return found


def decode_parts(
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
        if ranging is not None and is_large(candidate) and key not in cut:
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
