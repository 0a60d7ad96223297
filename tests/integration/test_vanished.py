"""A mail expunged between the poll's SEARCH and its FETCH, against a real Dovecot.

Staged deterministically: the mailbox the pipeline sees is the real `ImapMailbox`,
and just before it asks for the summaries another session expunges one of the UIDs
its SEARCH returned (as a person deleting the mail in their mail program would).
Dovecot then describes the gone mail with made-up data (0 bytes, an empty text/plain)
instead of leaving it out: without the adapter's check it became a false `no_pdf` row.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeOutbox
from tests.servers.dovecot import DovecotServer
from worker.config.environment import Secret
from worker.imap.mailbox import ImapMailbox
from worker.mail.verdicts import VANISHED_REASON
from worker.models import (
    AuditFilter,
    DedupMode,
    FolderStatus,
    MailSummary,
    Outcome,
    PasswordCredentials,
    Security,
)
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore

MAILBOX = "invoices@imap.example/INBOX"


class ExpungedBeforeFetch:
    """The real mailbox, with `doomed` expunged by another session right before FETCH."""

    def __init__(self, real: ImapMailbox, server: DovecotServer, doomed: set[int]) -> None:
        self._real = real
        self._server = server
        self.doomed = doomed
        self.summarised: list[int] = []

    def open(self) -> FolderStatus:
        return self._real.open()

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        return self._real.new_uids(after_uid, since)

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        self._server.delete_uids(sorted(self.doomed & set(uids)))
        self.summarised.extend(uids)
        return self._real.summaries(uids)

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        return self._real.fetch_sections(wanted, max_bytes=max_bytes)

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        return self._real.fetch_messages(uids)

    def close(self) -> None:
        self._real.close()


def test_a_mail_expunged_between_search_and_fetch_gets_a_final_row(
    imap: DovecotServer, tmp_path: Path
) -> None:
    first = imap.append(samples.invoice_mail(pdfs=[("a.pdf", samples.invoice_pdf())]))
    gone = imap.append(samples.invoice_mail(pdfs=[("b.pdf", samples.invoice_pdf(number="7"))]))
    last = imap.append(samples.plain_mail())
    assert imap.tls_port is not None
    mailbox = ExpungedBeforeFetch(
        ImapMailbox(
            host="127.0.0.1",
            port=imap.tls_port,
            security=Security.SSL,
            credentials=PasswordCredentials(user=imap.user, password=Secret(imap.password)),
            ca_file=imap.ca_file,
            timeout=10.0,
        ),
        imap,
        doomed={gone},
    )
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(store.engine)
    outbox = FakeOutbox()
    pipeline = Pipeline(
        config=PipelineConfig(
            mailbox=MAILBOX,
            forward_to="inbox@getmyinvoices.example",
            forward_from="relay@shop.example",
            dedup=DedupMode.BYTES,
        ),
        mailbox=mailbox,
        outbox=outbox,
        store=store,
        owner=poll_owner(store, MAILBOX),
        inspector=FakeInspector(),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        rng=random.Random(1),
        stop=threading.Event(),
    )
    try:
        pipeline.poll()
        rows = sorted(store.audit(AuditFilter()), key=lambda row: row.id)
        assert [(row.uid, row.outcome, row.reason) for row in rows] == [
            (first, Outcome.FORWARDED, None),
            (gone, Outcome.REJECTED, VANISHED_REASON),
            (last, Outcome.NO_PDF, None),
        ]
        assert len(outbox.sent) == 1
        position = store.position(MAILBOX)
        assert position is not None and position.last_uid == last

        # Not retried: the next poll asks the server about nothing, and the row stands.
        mailbox.summarised.clear()
        pipeline.poll()
        assert mailbox.summarised == []
        assert sorted(store.audit(AuditFilter()), key=lambda row: row.id) == rows
    finally:
        store.close()
