"""An error placeholder (a mail that failed as a whole) giving way to part rows: the
parts carry on its count of tries, so INVOICE_RELAY_ERROR_RETRIES bounds the whole mail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from tests.documents import DESTINATION, poll_owner
from worker.models import DedupMode, MailHeaders, MailRecord, PartRecord, SightingKind
from worker.store.schema import sightings
from worker.store.sqlstore import SqlStore

MAILBOX = "invoices@imap.example/INBOX"
FIRST = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def record(store: SqlStore, *parts: PartRecord, now: datetime) -> None:
    store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
        mailbox=MAILBOX,
        uidvalidity=1,
        mails=[MailRecord(uid=5, headers=MailHeaders(subject="Invoice"), parts=parts)],
        advance_to=None,
        dedup=DedupMode.BYTES,
        keep_pdfs=False,
        now=now,
    )


def rows(store: SqlStore) -> list[tuple[str, str, int, datetime]]:
    with store.engine.connect() as connection:
        result = connection.execute(
            sa.select(
                sightings.c.part, sightings.c.kind, sightings.c.tries, sightings.c.received_at
            ).order_by(sightings.c.part)
        )
        return [(r.part, r.kind, r.tries, r.received_at.replace(tzinfo=UTC)) for r in result]


WHOLE = PartRecord(part="", kind=SightingKind.ERROR, reason="DKIM: DNS lookup timed out")
PART = PartRecord(part="2", kind=SightingKind.ERROR, reason="PDF check failed: timed out")
NO_PDF = PartRecord(part="", kind=SightingKind.NO_PDF)


def test_part_rows_replacing_a_placeholder_keep_its_tries_and_first_sighting(
    store: SqlStore,
) -> None:
    record(store, WHOLE, now=FIRST)
    record(store, WHOLE, now=FIRST + timedelta(minutes=5))  # tried again: 2 tries
    record(store, PART, now=FIRST + timedelta(minutes=10))
    assert rows(store) == [("2", "error", 3, FIRST)]


def test_with_the_tries_carried_on_the_mail_is_given_up_in_time(store: SqlStore) -> None:
    record(store, WHOLE, now=FIRST)
    record(store, WHOLE, now=FIRST)
    record(store, PART, now=FIRST)
    record(store, PART, now=FIRST)
    # error_retries=3: four tries in all, whole or by part, then rejected.
    assert store.reject_exhausted_errors(mailbox=MAILBOX, max_tries=4) == 1
    assert [(part, kind, tries) for part, kind, tries, _ in rows(store)] == [("2", "rejected", 4)]


def test_a_mail_seen_first_with_its_parts_starts_at_one_try(store: SqlStore) -> None:
    record(store, PART, now=FIRST)
    assert rows(store) == [("2", "error", 1, FIRST)]


def test_a_placeholder_giving_way_to_a_final_row_counts_the_try_too(store: SqlStore) -> None:
    """A mail-level row only yields to part rows (its parts read at last); a mail-level
    outcome such as `no_pdf` replaces the placeholder in place, counting the try."""
    record(store, WHOLE, now=FIRST)
    record(store, NO_PDF, now=FIRST + timedelta(minutes=5))
    assert rows(store) == [("", "no_pdf", 2, FIRST)]
