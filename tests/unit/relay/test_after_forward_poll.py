"""The after-forward step inside a poll: after the send loop, on what that poll settled,
with the real SQLite store and in-memory IMAP and SMTP."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailActions, FakeMailbox, FakeOutbox, StoredMail
from worker.errors import DeliveryDeferred
from worker.models import AfterForward, AuditFilter, DedupMode, MailActionMode, PollReport
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig
from worker.relay.tidy import MailTidier
from worker.store.sqlstore import SqlStore

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NAME = "invoices@imap.example/INBOX"
PDF_A = samples.invoice_pdf(number="1042")
PDF_B = samples.invoice_pdf(number="1043", amount="12.50")


class Relay:
    def __init__(self, store: SqlStore, after: AfterForward) -> None:
        self.store = store
        self.mailbox = FakeMailbox()
        self.outbox = FakeOutbox()
        self.inspector = FakeInspector()
        self.stop = threading.Event()
        # The action session sees the same folder as the reading one.
        self.actions = FakeMailActions(
            {"INBOX": {}, "Done": {}}, uidvalidity=self.mailbox.uidvalidity
        )
        self.after = after

    def add(self, raw: bytes) -> int:
        uid = self.mailbox.add(raw)
        self.actions.folders["INBOX"][uid] = StoredMail(message_id=f"<{uid}>", flags=set())
        return uid

    def poll(self) -> PollReport:
        return Pipeline(
            config=PipelineConfig(
                mailbox=NAME,
                forward_to="to@example.test",
                forward_from="relay@shop.example",
                dedup=DedupMode.BYTES,
                retry_delay_seconds=3600,
            ),
            mailbox=self.mailbox,
            outbox=self.outbox,
            store=self.store,
            owner=poll_owner(self.store, NAME),
            inspector=self.inspector,
            clock=lambda: T0,
            rng=random.Random(1),
            stop=self.stop,
            tidier=MailTidier(
                after=self.after,
                mailbox=NAME,
                actions=self.actions,
                store=self.store,
                clock=lambda: T0,
            ),
        ).poll()

    def flagged(self) -> set[int]:
        return {uid for uid, mail in self.actions.folders["INBOX"].items() if mail.flags}


def test_the_action_is_taken_in_the_poll_that_forwarded(store: SqlStore) -> None:
    relay = Relay(store, AfterForward(mode=MailActionMode.FLAG))
    first = relay.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    second = relay.add(samples.invoice_mail(pdfs=[("b.pdf", PDF_B)]))
    relay.outbox.answers = [None, DeliveryDeferred("try later", code=451)]
    report = relay.poll()
    assert report.forwarded == 1 and report.mail_actions == 1
    assert relay.flagged() == {first}  # the pending one waits
    rows = {row.uid: row.mail_action for row in store.audit(AuditFilter())}
    assert rows == {first: "flagged", second: None}
    # The order: read (EXAMINE), then send, then the action session.
    assert relay.mailbox.calls[0] == "open" and relay.actions.log[0] == "SELECT"

    again = relay.poll()  # nothing due, nothing settled anew: no IMAP action session
    assert again.mail_actions == 0
    assert relay.actions.log.count("SELECT") == 1


def test_an_imap_failure_after_forwarding_is_reported_and_acted_on_later(store: SqlStore) -> None:
    relay = Relay(store, AfterForward(mode=MailActionMode.SEEN))
    uid = relay.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A)]))
    relay.actions.fail_on = "SELECT"
    report = relay.poll()
    assert report.forwarded == 1
    assert report.mail_action_problem is not None and "SELECT failed" in report.mail_action_problem
    assert relay.flagged() == set()
    relay.actions.fail_on = None
    assert relay.poll().mail_actions == 1  # taken by a later poll
    assert relay.flagged() == {uid}


def test_a_mail_with_an_error_part_waits_for_its_retry_then_moves(store: SqlStore) -> None:
    relay = Relay(store, AfterForward(mode=MailActionMode.MOVE, folder="Done"))
    inspector = FakeInspector()
    relay.inspector = inspector
    uid = relay.add(samples.invoice_mail(pdfs=[("a.pdf", PDF_A), ("b.pdf", PDF_B)]))
    inspector.crash_on.add(PDF_B)
    first = relay.poll()
    assert first.forwarded == 1 and first.mail_actions == 0  # b.pdf is an error: unsettled
    assert set(relay.actions.folders["INBOX"]) == {uid}
    inspector.crash_on.clear()
    second = relay.poll()  # the error row is read again by UID: the mail is still there
    assert second.forwarded == 1 and second.mail_actions == 1
    assert relay.actions.folders["INBOX"] == {}
    assert [mail.message_id for mail in relay.actions.folders["Done"].values()] == [f"<{uid}>"]
    # Gone from the folder, the UID disturbs nothing: no error row is left to re-fetch.
    relay.mailbox.mails.pop(uid)
    third = relay.poll()
    assert (third.mails_seen, third.forwarded, third.mail_actions) == (0, 0, 0)
    assert {row.mail_action for row in store.audit(AuditFilter())} == {"moved to Done"}
