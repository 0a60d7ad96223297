"""The dry run (`invoice-relay once --dry-run`): what a poll would record now, without
writing or sending anything."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from worker.models import DedupMode, MailRecord, SightingKind
from worker.relay.intake import Intake
from worker.relay.pollconfig import PipelineConfig, recorded_up_to, uid_batches
from worker.relay.ports import Mailbox, PollStore


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedSighting:
    """What a dry run would record for one part."""

    uid: int
    part: str
    kind: SightingKind
    reason: str | None
    filename: str | None
    sha256: str | None


def dry_run(
    *, config: PipelineConfig, mailbox: Mailbox, store: PollStore, intake: Intake
) -> list[PlannedSighting]:
    """A dry run: what a poll would record now, without writing or sending anything.
    Accepted PDFs whose key is known already (or seen earlier in this run) are shown
    as duplicates, so the DOCUMENT entries are exactly what would be forwarded."""
    status = mailbox.open()
    try:
        last_uid = recorded_up_to(store.position(config.mailbox), status)
        planned: list[PlannedSighting] = []
        seen: set[str] = set()
        uids = mailbox.new_uids(last_uid, config.since)
        for batch in uid_batches(uids, config.batch_size):
            for mails in intake.record_batches(batch):
                for mail in mails:
                    planned.extend(_planned(mail, seen, config=config, store=store))
        return planned
    finally:
        mailbox.close()


def _planned(
    mail: MailRecord, seen: set[str], *, config: PipelineConfig, store: PollStore
) -> Iterator[PlannedSighting]:
    for part in mail.parts:
        kind, reason = part.kind, part.reason
        if kind is SightingKind.DOCUMENT and part.sha256 is not None:
            content_key = part.fingerprint if config.dedup is DedupMode.CONTENT else None
            keys = {part.sha256} | ({content_key} if content_key else set())
            known = store.known_key(
                sha256=part.sha256, content_key=content_key, destination=config.destination
            )
            if known is not None or keys & seen:
                kind = SightingKind.DUPLICATE
                reason = (
                    f"same {known} as a recorded invoice"
                    if known
                    else ("same invoice as an earlier mail in this run")
                )
            seen.update(keys)
        yield PlannedSighting(
            uid=mail.uid,
            part=part.part,
            kind=kind,
            reason=reason,
            filename=part.filename,
            sha256=part.sha256,
        )
