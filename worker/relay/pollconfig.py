"""What one poll is told (`PipelineConfig`, built from the settings by the CLI), and
the two rules of reading that follow from it: where reading starts, and in which
batches the new UIDs are read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date

from worker.mail.trust import NO_PROOF, TrustPolicy
from worker.models import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_ERROR_RETRIES,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MAIL_BYTES,
    DEFAULT_MAX_PARTS,
    DEFAULT_MAX_PDF_BYTES,
    DEFAULT_RETRY_DELAY_SECONDS,
    DEFAULT_ROUTE,
    DEFAULT_SEND_BATCH,
    DedupMode,
    DeliveryKind,
    FolderStatus,
    MailboxPosition,
    smtp_destination,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    mailbox: str  # the audit's name for the polled folder: "user@host/folder"
    forward_to: str
    forward_from: str
    since: date | None = None
    dedup: DedupMode = DedupMode.CONTENT
    keep_pdfs: bool = False
    allowed_senders: tuple[str, ...] = ()
    max_mail_bytes: int = DEFAULT_MAX_MAIL_BYTES
    max_pdf_bytes: int = DEFAULT_MAX_PDF_BYTES
    max_parts: int = DEFAULT_MAX_PARTS
    max_depth: int = DEFAULT_MAX_DEPTH
    trust: TrustPolicy = NO_PROOF
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    error_retries: int = DEFAULT_ERROR_RETRIES
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    batch_size: int = 200
    batch_bytes: int = DEFAULT_BATCH_BYTES  # RFC822.SIZE a batch reads (worker.relay.mailparts)
    send_batch: int = DEFAULT_SEND_BATCH
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS  # doubles per attempt
    delivery: DeliveryKind = DeliveryKind.SMTP  # where documents go (INVOICE_RELAY_DELIVERY)
    route: str = DEFAULT_ROUTE  # the route's name, recorded on every sighting
    # Where its documents go, the key of its dedup: "" means `smtp:<forward_to>` (an
    # API route's wiring passes its account's, or the route's own `destination`).
    destination: str = ""

    def __post_init__(self) -> None:
        if not self.destination:
            object.__setattr__(self, "destination", smtp_destination(self.forward_to))


def recorded_up_to(position: MailboxPosition | None, status: FolderStatus) -> int:
    """Every UID up to this one is recorded; 0 when the folder must be read from the start."""
    if position is not None and position.uidvalidity == status.uidvalidity:
        return position.last_uid
    return 0


def uid_batches(
    items: Sequence[int], size: int, *, first: int | None = None
) -> Iterator[list[int]]:
    """Batches of `size`; with `first`, they start at `first` and double up to `size`, so
    a backfill's sending thread gets its first documents after a few mails, not 200."""
    start, step = 0, min(first or size, size)
    while start < len(items):
        yield list(items[start : start + step])
        start += step
        step = min(step * 2, size)
