"""Routes crossing destinations against real servers: three folders of one Dovecot user
(each a route's mailbox), the aiosmtpd sink as every destination's inbox (the envelope
says which), SQLite and PostgreSQL. The same PDF bound for two destinations goes to
each; two folders feeding one destination dedupe together; a document waits for the
route whose mail introduced it. The pipeline runs in-process with its real adapters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.cli import wiring
from worker.config.settings import Settings
from worker.models import AuditFilter, Outcome, PollReport
from worker.relay.pipeline import Pipeline
from worker.store import migrate
from worker.store.sqlstore import SqlStore

# route: (folder, forward_to). shop-a and shop-c deliver to one inbox.
ROUTES = {
    "shop-a": ("INBOX", "A@Accounting.example"),
    "shop-b": ("Shop B", "b@accounting.example"),
    "shop-c": ("Shop C", "a@accounting.example"),
}


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    migrate.upgrade_database(database_url)
    store = SqlStore(database_url)
    yield store
    store.close()


@pytest.fixture
def folders(imap: DovecotServer) -> DovecotServer:
    for folder, _ in ROUTES.values():
        if folder != "INBOX":
            imap.create_folder(folder)
    return imap


def poll(
    route: str,
    *,
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    store: SqlStore,
    url: str,
) -> PollReport:
    folder, forward_to = ROUTES[route]
    settings = Settings.from_env(
        relay_env(
            imap,
            smtp,
            url,
            smtp_ca=smtp_ca,
            INVOICE_RELAY_IMAP_FOLDER=folder,
            INVOICE_RELAY_FORWARD_TO=forward_to,
        )
    )
    inspector = wiring.pdf_inspector(settings)
    try:
        config = wiring.pipeline_config(settings, route=route)
        return Pipeline(
            config=config,
            mailbox=wiring.imap_mailbox(settings),
            outbox=wiring.smtp_outbox(settings),
            store=store,
            owner=poll_owner(store, config.mailbox),
            inspector=inspector,
        ).poll()
    finally:
        inspector.close()


def invoice(number: str, message_id: str) -> bytes:
    return samples.invoice_mail(
        pdfs=[(f"Invoice {number}.pdf", samples.invoice_pdf(number=number))],
        subject=f"Invoice {number}",
        message_id=message_id,
    )


def test_routes_crossing_destinations(
    folders: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, store: SqlStore, database_url: str
) -> None:
    imap = folders
    # One invoice reaches all three folders (a supplier mailing every shop), one only
    # shop-c's, and one shop-a's that shop-a's destination refuses at first.
    for route, (folder, _) in ROUTES.items():
        imap.append(invoice("1042", f"<1042-{route}@supplier.example>"), folder=folder)
    imap.append(invoice("2001", "<2001@supplier.example>"), folder="Shop C")
    imap.append(invoice("3003", "<3003@supplier.example>"), folder="INBOX")
    smtp.fail_matching(
        lambda message: "Invoice 3003" in str(message["Subject"]), 550, "5.7.1 not now"
    )

    def run(route: str) -> PollReport:
        return poll(route, imap=imap, smtp=smtp, smtp_ca=smtp_ca, store=store, url=database_url)

    shop_a = run("shop-a")
    assert (shop_a.forwarded, shop_a.failed) == (1, 1)
    smtp.clear_failures()
    # A person re-queues it: due at once, and still shop-a's to send.
    sha_3003 = next(
        row.sha256 for row in store.audit(AuditFilter()) if row.subject == "Invoice 3003"
    )
    assert store.requeue(sha256=sha_3003, now=shop_a.finished_at) == 1

    shop_b, shop_c = run("shop-b"), run("shop-c")
    # shop-b's destination had nothing of 1042: it goes there too. shop-c shares
    # shop-a's destination: its 1042 is a duplicate, its 2001 new. Neither poll sent
    # shop-a's 3003, due as it is.
    assert (shop_b.forwarded, shop_b.pending) == (1, 0)
    assert (shop_c.forwarded, shop_c.pending) == (1, 0)

    sent = [(mail.rcpt_tos, str(mail.message["Subject"])) for mail in smtp.messages]
    assert sorted(sent) == [
        (("A@Accounting.example",), "Invoice 1042"),
        (("a@accounting.example",), "Invoice 2001"),
        (("b@accounting.example",), "Invoice 1042"),
    ]
    message_ids = [str(mail.message["Message-ID"]) for mail in smtp.messages]
    assert len(set(message_ids)) == 3  # 1042 to two destinations: two deliveries

    rows = {(row.route, row.subject): row for row in store.audit(AuditFilter())}
    assert rows["shop-c", "Invoice 1042"].outcome is Outcome.DUPLICATE
    assert rows["shop-c", "Invoice 1042"].duplicate_of == rows["shop-a", "Invoice 1042"].id
    assert rows["shop-b", "Invoice 1042"].outcome is Outcome.FORWARDED
    assert rows["shop-b", "Invoice 1042"].destination == "smtp:b@accounting.example"
    assert rows["shop-a", "Invoice 1042"].destination == "smtp:a@accounting.example"
    assert rows["shop-a", "Invoice 3003"].outcome is Outcome.PENDING

    # The next poll of shop-a sends it.
    again = run("shop-a")
    assert (again.forwarded, again.pending) == (1, 0)
    subjects = [str(mail.message["Subject"]) for mail in smtp.messages]
    assert subjects.count("Invoice 3003") == 1
    assert smtp.messages[-1].rcpt_tos == ("A@Accounting.example",)
