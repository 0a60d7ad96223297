"""The `audit_log` view as SqlStore reads it, against SQLite and PostgreSQL (`integration`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.documents import OWNER
from tests.storecases import (
    MAILBOX,
    T0,
    UIDVALIDITY,
    StoreFactory,
    accepted,
    mail,
    pdf,
    record,
)
from worker.models import (
    AuditFilter,
    Outcome,
    PartRecord,
    SightingKind,
)
from worker.store.sqlstore import SqlStore


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    return store_factory()


# --- the audit view --------------------------------------------------------------------


def test_the_audit_view_shows_outcomes_and_forwarding(store: SqlStore) -> None:
    first, duplicate, _, _ = record(
        store,
        mail(1, accepted(pdf("a"), invoice_number="1042")),
        mail(2, accepted(pdf("a"), invoice_number="1042")),
        mail(3, PartRecord(part="2", kind=SightingKind.REJECTED, reason="not a PDF")),
        mail(4, PartRecord(part="", kind=SightingKind.NO_PDF)),
        now=T0,
    )
    record(store, mail(5, accepted(pdf("b"))), now=T0 + timedelta(hours=1))
    sent, refused = store.claim_due(
        mailbox=MAILBOX, owner=OWNER, now=T0 + timedelta(hours=1), limit=10, lease_seconds=60
    )
    store.mark_forwarded(
        sent.document_id,
        owner=OWNER,
        message_id="<out-1@relay>",
        answer="250 queued",
        now=T0 + timedelta(hours=2),
        keep_pdf=False,
    )
    store.mark_failed(refused.document_id, owner=OWNER, answer="554 5.7.1 spam")

    rows = store.audit(AuditFilter())
    assert [row.uid for row in rows] == [5, 4, 3, 2, 1]  # newest first
    by_uid = {row.uid: row for row in rows}
    assert by_uid[1].outcome is Outcome.FORWARDED
    assert by_uid[1].forwarded_at == T0 + timedelta(hours=2)
    assert by_uid[1].forwarded_message_id == "<out-1@relay>"
    assert by_uid[1].attempts == 1
    assert by_uid[1].duplicate_of is None
    assert by_uid[2].outcome is Outcome.DUPLICATE
    assert by_uid[2].duplicate_of == first.sighting_id
    assert by_uid[2].reason == duplicate.reason
    assert (by_uid[2].forwarded_at, by_uid[2].forwarded_message_id, by_uid[2].attempts) == (
        None,
        None,
        None,
    )
    assert by_uid[3].outcome is Outcome.REJECTED
    assert by_uid[3].reason == "not a PDF"
    assert by_uid[4].outcome is Outcome.NO_PDF
    assert by_uid[4].sha256 is None
    assert by_uid[5].outcome is Outcome.FAILED
    assert by_uid[5].reason == "554 5.7.1 spam"
    assert by_uid[5].received_at == T0 + timedelta(hours=1)
    assert by_uid[1].mail_date == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert (by_uid[1].mailbox, by_uid[1].uidvalidity) == (MAILBOX, UIDVALIDITY)

    since = store.audit(AuditFilter(since=T0 + timedelta(minutes=30)))
    assert [row.uid for row in since] == [5]
    chosen = store.audit(AuditFilter(outcomes=(Outcome.DUPLICATE, Outcome.NO_PDF)))
    assert [row.uid for row in chosen] == [4, 2]
    invoice = store.audit(AuditFilter(invoice_number="1042"))
    assert [row.uid for row in invoice] == [2, 1]
    assert [row.uid for row in store.audit(AuditFilter(limit=2))] == [5, 4]
    sent_count = len(store.audit(AuditFilter(outcomes=(Outcome.FORWARDED,))))
    assert sent_count == 1
