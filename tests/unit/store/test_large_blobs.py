"""Large PDFs go into SQLite and come back through blob I/O, byte for byte; small ones
as bound parameters. The same records, either way."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from tests.documents import DESTINATION, OWNER, poll_owner
from worker.models import DedupMode, MailHeaders, MailRecord, PartRecord, SightingKind
from worker.store.engine import LARGE_BLOB
from worker.store.sqlstore import SqlStore

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def pdf(size: int, seed: int) -> bytes:
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return (b"%PDF-1.7\n" + body)[:size]


def record(store: SqlStore, uid: int, content: bytes) -> None:
    part = PartRecord(
        part="2",
        kind=SightingKind.DOCUMENT,
        filename=f"{uid}.pdf",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        fingerprint=f"fp:{uid}",
        content=content,
    )
    store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, "INBOX"),
        mailbox="INBOX",
        uidvalidity=1,
        mails=[MailRecord(uid=uid, headers=MailHeaders(subject=f"mail {uid}"), parts=(part,))],
        advance_to=uid,
        dedup=DedupMode.CONTENT,
        keep_pdfs=False,
        now=NOW,
    )


def test_large_and_small_pdfs_come_back_byte_for_byte(store: SqlStore) -> None:
    contents = [
        pdf(1000, 1),
        pdf(LARGE_BLOB - 1, 2),
        pdf(LARGE_BLOB, 3),
        pdf(3 * LARGE_BLOB + 17, 4),
    ]
    for uid, content in enumerate(contents, start=1):
        record(store, uid, content)

    claimed = store.claim_due(mailbox="INBOX", owner=OWNER, now=NOW, limit=10, lease_seconds=60)

    assert [document.content for document in claimed] == contents
    assert [document.original_subject for document in claimed] == [
        f"mail {uid}" for uid in range(1, 5)
    ]


def test_a_large_duplicate_is_recognised_and_not_stored_again(store: SqlStore) -> None:
    content = pdf(2 * LARGE_BLOB, 5)
    record(store, 1, content)
    record(store, 2, content)

    claimed = store.claim_due(mailbox="INBOX", owner=OWNER, now=NOW, limit=10, lease_seconds=60)

    assert [document.content for document in claimed] == [content]
