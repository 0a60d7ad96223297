"""0011_destinations with data in it: documents that existed stay known to every
destination (nothing already forwarded goes out again anywhere), each keeps the folder
that introduced it, and the rows that name a document survive SQLite's rebuild."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.storecases import accepted, mail, pdf, record
from worker.models import AuditFilter, DedupMode, Outcome, OutgoingDocument, SightingKind
from worker.store import migrate
from worker.store.engine import make_engine
from worker.store.sqlstore import SqlStore

BEFORE = "0012_invoice_number_certainty"  # 0011 follows it
SHOP = "shop@imap.example/INBOX"
OTHER = "other@imap.example/INBOX"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def sha(text: str) -> str:
    return hashlib.sha256(pdf(text)).hexdigest()


def fill_before_destinations(url: str) -> None:
    """As 0008 left a relay: a forwarded document (its PDF dropped) seen again in
    another folder, a pending one with its PDF, a failed one with a content key."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO documents (id, sha256, content_key, state, attempts,"
                    " next_attempt_at, forwarded_message_id, resend_count, created_at) VALUES"
                    " (1, :a, NULL, 'forwarded', 1, :now, '<a@relay>', 0, :now),"
                    " (2, :b, NULL, 'pending', 0, :now, NULL, 0, :now),"
                    " (3, :c, 'fp:c', 'failed', 5, :now, NULL, 0, :now)"
                ),
                {"a": sha("a"), "b": sha("b"), "c": sha("c"), "now": NOW},
            )
            for document_id in (2, 3):
                connection.execute(
                    sa.text("INSERT INTO document_contents VALUES (:id, :pdf)"),
                    {"id": document_id, "pdf": pdf("bc"[document_id - 2])},
                )
            connection.execute(
                sa.text(
                    "INSERT INTO sightings (id, mailbox, uidvalidity, uid, part, received_at,"
                    " message_id, sender, subject, sha256, kind, tries, document_id,"
                    " duplicate_of) VALUES"
                    " (1, :shop, 7, 1, '2', :now, '', '', '', :a, 'document', 1, 1, NULL),"
                    " (2, :shop, 7, 2, '2', :now, '', '', '', :b, 'document', 1, 2, NULL),"
                    " (3, :shop, 7, 3, '2', :now, '', '', '', :c, 'document', 1, 3, NULL),"
                    " (4, :other, 7, 1, '2', :now, '', '', '', :a, 'duplicate', 1, 1, 1)"
                ),
                {"shop": SHOP, "other": OTHER, "now": NOW, **{k: sha(k) for k in "abc"}},
            )
            connection.execute(
                sa.text("INSERT INTO notifications VALUES (1, :now, 'boss@example.test', 3, 1, 0)"),
                {"now": NOW},
            )
            connection.execute(sa.text("INSERT INTO notified_documents VALUES (3, 1)"))
            if connection.dialect.name == "postgresql":  # the ids above were given
                for table in ("documents", "sightings", "notifications"):
                    connection.execute(
                        sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)")
                    )
    finally:
        engine.dispose()


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(query))]
    finally:
        engine.dispose()


def test_documents_before_destinations_stay_known_everywhere(empty_database: str) -> None:
    migrate.upgrade_database(empty_database, BEFORE)
    fill_before_destinations(empty_database)
    migrate.upgrade_database(empty_database)

    assert rows(empty_database, "SELECT id, destination, mailbox FROM documents ORDER BY id") == [
        (1, None, SHOP),
        (2, None, SHOP),
        (3, None, SHOP),
    ]
    # Every row that names a document found it again after the rebuild (SQLite).
    assert rows(empty_database, "SELECT document_id FROM document_contents ORDER BY 1") == [
        (2,),
        (3,),
    ]
    assert rows(empty_database, "SELECT document_id FROM notified_documents") == [(3,)]
    assert rows(
        empty_database, "SELECT id, route, destination, outcome FROM audit_log ORDER BY id"
    ) == [
        (1, "default", None, "forwarded"),
        (2, "default", None, "pending"),
        (3, "default", None, "failed"),
        (4, "default", None, "duplicate"),
    ]
    if empty_database.startswith("sqlite"):
        assert rows(empty_database, "PRAGMA foreign_key_check") == []

    store = SqlStore(empty_database)
    try:
        # The forwarded invoice arrives again, in its folder and in another bound
        # elsewhere, and the failed one's content by other bytes: all duplicates.
        (again,) = record(
            store, mail(10, accepted(pdf("a"))), mailbox=SHOP, destination="smtp:a@example.test"
        )
        (elsewhere,) = record(
            store, mail(11, accepted(pdf("a"))), mailbox=OTHER, destination="smtp:b@example.test"
        )
        (same_content,) = record(
            store,
            mail(12, accepted(pdf("c2"), fingerprint="fp:c")),
            mailbox=OTHER,
            destination="smtp:b@example.test",
            dedup=DedupMode.CONTENT,
        )
        (new,) = record(
            store, mail(13, accepted(pdf("d"))), mailbox=OTHER, destination="smtp:b@example.test"
        )
        assert [again.kind, elsewhere.kind, same_content.kind] == [SightingKind.DUPLICATE] * 3
        assert (again.document_id, elsewhere.document_id, same_content.document_id) == (1, 1, 3)
        assert new.kind is SightingKind.DOCUMENT

        # The pending one is still sent, by a poll of the folder that introduced it
        # only, under the Message-ID form it had before (no destination).
        assert [d.sha256 for d in claim(store, OTHER)] == [sha("d")]
        (pending,) = claim(store, SHOP)
        assert (pending.document_id, pending.destination) == (2, None)
        by_uid = {(row.mailbox, row.uid): row for row in store.audit(AuditFilter())}
        assert (by_uid[OTHER, 13].outcome, by_uid[OTHER, 13].destination) == (
            Outcome.PENDING,
            "smtp:b@example.test",
        )
        assert by_uid[OTHER, 11].destination is None  # a duplicate of a document of all
    finally:
        store.close()


def claim(store: SqlStore, mailbox: str) -> list[OutgoingDocument]:
    return store.claim_due(now=NOW, limit=10, owner="tests", lease_seconds=60, mailbox=mailbox)


def test_the_downgrade_restores_one_dedup_while_no_sha256_is_shared(empty_database: str) -> None:
    migrate.upgrade_database(empty_database, BEFORE)
    fill_before_destinations(empty_database)
    migrate.upgrade_database(empty_database)
    migrate.downgrade_database(empty_database, BEFORE)
    assert rows(empty_database, "SELECT id, sha256 FROM documents ORDER BY id") == [
        (1, sha("a")),
        (2, sha("b")),
        (3, sha("c")),
    ]
    assert rows(empty_database, "SELECT document_id FROM document_contents ORDER BY 1") == [
        (2,),
        (3,),
    ]
    migrate.upgrade_database(empty_database)
    store = SqlStore(empty_database)
    try:
        for number, destination in enumerate(["smtp:a@example.test", "smtp:b@example.test"]):
            record(
                store,
                mail(20 + number, accepted(pdf("shared"))),
                mailbox=OTHER,
                destination=destination,
            )
    finally:
        store.close()
    with pytest.raises(RuntimeError, match="documents of several destinations share the sha256"):
        migrate.downgrade_database(empty_database, BEFORE)
    assert migrate.is_up_to_date(empty_database)  # refused as a whole: nothing changed
