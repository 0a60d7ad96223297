"""The store's side of INVOICE_RELAY_AFTER_FORWARD: which mails hold a forwarded
document and are not acted on yet, and `audit_log.mail_action`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest
import sqlalchemy as sa

from tests.documents import DESTINATION, poll_owner
from tests.fakes import FakeMailActionStore
from tests.servers.postgres import postgres_server, temporary_database
from worker.models import (
    AuditFilter,
    DedupMode,
    DocumentState,
    MailHeaders,
    MailRecord,
    PartRecord,
    PartState,
    SightingKind,
    UntidiedMail,
)
from worker.store.engine import create_schema, make_engine
from worker.store.schema import documents
from worker.store.sqlstore import SqlStore

MAILBOX = "relay@example.test/INBOX"
UIDVALIDITY = 7
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        context = None
        url = f"sqlite:///{tmp_path / 'relay.db'}"
    else:
        context = temporary_database(request.getfixturevalue("postgres_base_url"))
        url = context.__enter__()
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    opened = SqlStore(url)
    try:
        yield opened
    finally:
        opened.close()
        if context is not None:
            context.__exit__(None, None, None)


def accepted(text: str, part: str = "2") -> PartRecord:
    content = f"%PDF-1.4 {text}".encode()
    return PartRecord(
        part=part,
        kind=SightingKind.DOCUMENT,
        filename="invoice.pdf",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        content=content,
    )


def rejected(part: str = "3") -> PartRecord:
    return PartRecord(part=part, kind=SightingKind.REJECTED, reason="not a PDF")


def mail(uid: int, *parts: PartRecord) -> MailRecord:
    return MailRecord(uid=uid, headers=MailHeaders(message_id=f"<{uid}@shop.example>"), parts=parts)


def record(store: SqlStore, *mails: MailRecord, uidvalidity: int = UIDVALIDITY) -> None:
    store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, MAILBOX),
        mailbox=MAILBOX,
        uidvalidity=uidvalidity,
        mails=mails,
        advance_to=None,
        dedup=DedupMode.BYTES,
        keep_pdfs=False,
        now=T0,
    )


def set_state(store: SqlStore, text: str, state: DocumentState) -> None:
    sha256 = accepted(text).sha256
    with store.engine.begin() as connection:
        connection.execute(
            sa.update(documents).where(documents.c.sha256 == sha256).values(state=state.value)
        )


def untidied(store: SqlStore, limit: int = 100) -> dict[int, tuple[PartState, ...]]:
    found = store.untidied_mails(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, limit=limit)
    return {mail.uid: mail.parts for mail in found}


F = PartState(kind=SightingKind.DOCUMENT, document_state=DocumentState.FORWARDED)
DF = PartState(kind=SightingKind.DUPLICATE, document_state=DocumentState.FORWARDED)
P = PartState(kind=SightingKind.DOCUMENT, document_state=DocumentState.PENDING)
DP = PartState(kind=SightingKind.DUPLICATE, document_state=DocumentState.PENDING)
R = PartState(kind=SightingKind.REJECTED, document_state=None)
N = PartState(kind=SightingKind.NO_PDF, document_state=None)


def test_only_mails_with_a_forwarded_document_come_back_with_all_their_parts(
    store: SqlStore,
) -> None:
    record(
        store,
        mail(1, accepted("a")),
        mail(2, accepted("a")),  # a duplicate of the forwarded one
        mail(3, accepted("b"), rejected()),
        mail(4, accepted("c")),  # stays pending
        mail(5, accepted("c"), accepted("a", part="4")),  # dup of pending + dup of forwarded
        mail(6, rejected()),
        mail(7, PartRecord(part="", kind=SightingKind.NO_PDF)),
    )
    record(store, mail(1, accepted("a")), uidvalidity=UIDVALIDITY + 1)  # another numbering
    for text in ("a", "b"):
        set_state(store, text, DocumentState.FORWARDED)
    assert untidied(store) == {1: (F,), 2: (DF,), 3: (F, R), 5: (DP, DF)}
    assert list(untidied(store, limit=2)) == [1, 2]
    first = store.untidied_mails(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, limit=1)[0]
    assert first.message_id == "<1@shop.example>"
    assert not first.copy_started


def test_recorded_actions_show_in_the_audit_and_happen_once(store: SqlStore) -> None:
    record(
        store, mail(1, accepted("a"), rejected()), mail(2, accepted("b")), mail(3, accepted("c"))
    )
    for text in ("a", "b", "c"):
        set_state(store, text, DocumentState.FORWARDED)
    store.start_copy(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uid=1, now=T0)
    store.start_copy(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uid=1, now=T0)  # a repeat
    copying = store.untidied_mails(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, limit=10)
    assert [(m.uid, m.copy_started) for m in copying] == [(1, True), (2, False), (3, False)]
    audit = {row.uid: row.mail_action for row in store.audit(AuditFilter())}
    assert audit == {1: None, 2: None, 3: None}  # `copying` is not an action yet

    store.record_mail_actions(
        mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uids=[1], action="moved to Done", now=T0
    )
    store.record_mail_actions(
        mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uids=[2], action=None, note="gone", now=T0
    )
    # Done is never overwritten, not even by a second record.
    store.record_mail_actions(
        mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uids=[1, 3], action="seen", now=T0
    )
    assert untidied(store) == {}
    rows = [(row.uid, row.mail_action) for row in store.audit(AuditFilter())]
    assert sorted(rows, key=lambda row: (row[0], row[1] or "")) == [
        (1, "moved to Done"),
        (1, "moved to Done"),
        (2, None),
        (3, "seen"),
    ]


# --- the fake the tidier's tests use keeps the same recording rules ---------------------


class ActionStore(Protocol):
    def untidied_mails(
        self, *, mailbox: str, uidvalidity: int, limit: int
    ) -> list[UntidiedMail]: ...

    def start_copy(self, *, mailbox: str, uidvalidity: int, uid: int, now: datetime) -> None: ...

    def record_mail_actions(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        uids: Sequence[int],
        action: str | None,
        note: str | None = None,
        now: datetime,
    ) -> None: ...


@pytest.fixture(params=["fake", "sqlite"])
def three_forwarded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ActionStore]:
    """Mails 1, 2 and 3, each with one forwarded document and no action yet."""
    if request.param == "fake":
        yield FakeMailActionStore(
            [
                UntidiedMail(uid=uid, message_id=f"<{uid}@shop.example>", parts=(F,))
                for uid in (1, 2, 3)
            ]
        )
        return
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    sql = SqlStore(url)
    try:
        record(sql, mail(1, accepted("a")), mail(2, accepted("b")), mail(3, accepted("c")))
        for text in ("a", "b", "c"):
            set_state(sql, text, DocumentState.FORWARDED)
        yield sql
    finally:
        sql.close()


def test_both_stores_record_actions_once(three_forwarded: ActionStore) -> None:
    store = three_forwarded

    def states() -> list[tuple[int, bool]]:
        found = store.untidied_mails(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, limit=10)
        return [(mail.uid, mail.copy_started) for mail in found]

    assert states() == [(1, False), (2, False), (3, False)]
    store.start_copy(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uid=2, now=T0)
    store.start_copy(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uid=2, now=T0)
    assert states() == [(1, False), (2, True), (3, False)]
    store.record_mail_actions(
        mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uids=[2], action="moved to Done", now=T0
    )
    store.record_mail_actions(
        mailbox=MAILBOX, uidvalidity=UIDVALIDITY, uids=[3], action=None, note="gone", now=T0
    )
    assert states() == [(1, False)]
    assert [
        m.uid for m in store.untidied_mails(mailbox=MAILBOX, uidvalidity=UIDVALIDITY, limit=0)
    ] == []
