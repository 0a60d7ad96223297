"""Delivery through the (fake) GetMyInvoices API with the real store, forwarder and
adapter: each distinct invoice uploaded once with its documentUid in the audit, each
answer class, a crash after the upload went out, and budgets shared by two stores."""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests import samples
from tests.documents import OWNER, QUEUE_MAILBOX, send_loop, wait_for_leases_to_expire
from tests.servers.getmyinvoices import UNAVAILABLE, FakeGetMyInvoices, refused, unprocessable
from tests.storecases import T0, accepted, mail, pdf, record
from worker.config.environment import Secret
from worker.delivery.getmyinvoices import GmiDestination
from worker.delivery.gmiapi import AMBIGUOUS_NUMBER
from worker.errors import DestinationRefused
from worker.faults import Checkpoint, CrashAt, CrashHook, CrashPoint, no_checkpoint
from worker.mail.verdicts import checked_part
from worker.models import (
    DEFAULT_GMI_CREDIT_NOTE_PATTERN,
    AuditFilter,
    DocumentState,
    Outcome,
    Parcel,
)
from worker.pdf.inspection import inspect_pdf
from worker.relay.budget import Budget, SharedBudget, Window
from worker.store import migrate
from worker.store.schema import delivery_budgets
from worker.store.sqlstore import SqlStore

KEY = "test-key-123"


@pytest.fixture
def api() -> Iterator[FakeGetMyInvoices]:
    with FakeGetMyInvoices(api_key=KEY) as fake:
        yield fake
    assert fake.problems() == []  # every request the relay sent follows the schema


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    migrate.upgrade_database(database_url)
    sql = SqlStore(database_url)
    yield sql
    sql.close()


def _destination(
    api: FakeGetMyInvoices,
    store: SqlStore,
    *,
    now: datetime,
    budget: Budget | None = None,
    checkpoint: Checkpoint = no_checkpoint,
) -> GmiDestination:
    return GmiDestination(
        api_key=Secret(KEY),
        budget=SharedBudget(store=store, budget=budget or Budget(), clock=lambda: now),
        marks=store,
        api_url=api.url,
        credit_note_pattern=re.compile(DEFAULT_GMI_CREDIT_NOTE_PATTERN),
        timeout=5.0,
        clock=lambda: now,
        checkpoint=checkpoint,
    )


class Crashed(BaseException):
    """Stands in for os._exit: nothing after the crash point runs."""


def _crash(point: CrashPoint | None) -> Checkpoint:
    if point is None:
        return no_checkpoint
    return CrashHook(CrashAt(point=point), exit=_raise)


def _raise(status: int) -> None:
    raise Crashed(status)


def _send(
    api: FakeGetMyInvoices,
    store: SqlStore,
    *,
    now: datetime = T0,
    budget: Budget | None = None,
    crash_at: CrashPoint | None = None,
) -> tuple[int, int, int]:
    checkpoint = _crash(crash_at)
    destination = _destination(api, store, now=now, budget=budget, checkpoint=checkpoint)
    forwarder = send_loop(store, destination, now=now, send_batch=5, checkpoint=checkpoint)
    return forwarder.forward_due()


def _backfill(store: SqlStore) -> None:
    record(
        store,
        mail(1, accepted(pdf("A"), invoice_number="RE-1")),
        mail(2, accepted(pdf("A"))),  # the same invoice again: a duplicate
        mail(3, accepted(pdf("B"), filename="Gutschrift-3.pdf")),
        mail(4, accepted(pdf("C")), subject="Storno zu RE-1"),
    )


def test_a_backfill_uploads_each_invoice_once(api: FakeGetMyInvoices, store: SqlStore) -> None:
    _backfill(store)
    assert _send(api, store) == (3, 0, 0)
    assert len(api.uploads()) == 3 and len(api.documents) == 3
    kinds = [d.request["documentType"] for d in api.documents]
    assert kinds == ["SALES_INVOICE", "CREDIT_NOTE", "CREDIT_NOTE"]
    assert api.documents[0].request["documentNumber"] == "RE-1"
    rows = {row.uid: row for row in store.audit(AuditFilter())}
    assert rows[1].outcome is Outcome.FORWARDED and rows[2].outcome is Outcome.DUPLICATE
    assert {rows[uid].delivery_id for uid in (1, 3, 4)} == {str(d.uid) for d in api.documents}
    assert {rows[uid].delivered_via for uid in (1, 3, 4)} == {"getmyinvoices"}
    assert rows[1].forwarded_message_id is None
    assert _send(api, store) == (0, 0, 0)  # nothing twice


def test_an_ambiguous_invoice_number_is_not_filed(api: FakeGetMyInvoices, store: SqlStore) -> None:
    # Real PDFs, read by the PDF check as a poll reads them; the flag travels through the
    # database, so whichever poll or replica uploads the document knows it.
    plain = samples.invoice_pdf(number="1042", logo=False)
    repeated = samples.joined_pdf(plain, samples.invoice_pdf(number="1042", amount="5.00"))
    corrects = samples.invoice_pdf(number="1044", lines=[("Corrects Invoice No. 1041", "-5")])
    for uid, data in enumerate((plain, repeated, corrects), start=1):
        part = checked_part("2", f"{uid}.pdf", data, inspect_pdf(data))
        record(store, mail(uid, part))
    assert _send(api, store) == (3, 0, 0)
    sent = {d.request["fileName"]: d.request for d in api.documents}  # schema-checked
    assert sent["1.pdf"]["documentNumber"] == "1042"
    assert sent["2.pdf"]["documentNumber"] == "1042"  # the same number on both pages
    assert "documentNumber" not in sent["3.pdf"]  # 1044 and 1041: which is it?
    assert AMBIGUOUS_NUMBER in sent["3.pdf"]["note"]
    assert all(AMBIGUOUS_NUMBER not in sent[name]["note"] for name in ("1.pdf", "2.pdf"))
    numbers = {row.uid: row.invoice_number for row in store.audit(AuditFilter())}
    assert numbers == {1: "1042", 2: "1042", 3: "1044"}  # the audit keeps the first read


@pytest.mark.parametrize(
    "answer", [unprocessable(105), refused(429), UNAVAILABLE], ids=["105", "403-429", "503"]
)
def test_a_limit_leaves_the_document_pending_uncounted(
    api: FakeGetMyInvoices, store: SqlStore, answer: object
) -> None:
    record(store, mail(1, accepted(pdf("A"))), mail(2, accepted(pdf("B"))))
    api.faults.append(answer)  # type: ignore[arg-type]
    # Both wait: the first for the answer, the second for the hold it left for every sharer.
    assert _send(api, store) == (0, 2, 0)
    assert store.state_counts()[DocumentState.PENDING] == 2
    rows = store.audit(AuditFilter())
    assert [row.attempts for row in rows] == [0, 0]
    # The audit says which limit, and when the document resumes.
    assert all(
        "limit" in (row.reason or "") or "availability" in (row.reason or "") for row in rows
    )
    assert all("resumes" in (row.reason or "") for row in rows)
    assert len(api.uploads()) == 1  # the second was never sent
    assert _send(api, store, now=T0 + timedelta(hours=2)) == (2, 0, 0)


def test_an_unexpected_error_is_an_attempt(api: FakeGetMyInvoices, store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("A"))))
    api.faults.append(unprocessable(100))
    assert _send(api, store) == (0, 1, 0)
    (row,) = store.audit(AuditFilter())
    assert (row.outcome, row.attempts) == (Outcome.PENDING, 1)


def test_another_refusal_fails_the_document(api: FakeGetMyInvoices, store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("A"))))
    api.faults.append(unprocessable(101, "File type not supported."))
    assert _send(api, store) == (0, 0, 1)
    (row,) = store.audit(AuditFilter())
    assert row.outcome is Outcome.FAILED
    assert "error_code 101" in (row.reason or "")


@pytest.mark.parametrize(
    ("code", "cause"), [(403, "unknown"), (407, "blocked"), (430, "permission"), (431, "cancelled")]
)
def test_a_refused_key_refuses_the_session(
    api: FakeGetMyInvoices, store: SqlStore, code: int, cause: str
) -> None:
    record(store, mail(1, accepted(pdf("A"))))
    api.account_faults.append(refused(code))
    with pytest.raises(DestinationRefused, match=cause) as raised:
        _send(api, store)
    assert KEY not in str(raised.value)
    (row,) = store.audit(AuditFilter())
    assert (row.outcome, row.attempts) == (Outcome.PENDING, 0)


def test_already_there_is_forwarded_without_an_id(api: FakeGetMyInvoices, store: SqlStore) -> None:
    record(store, mail(1, accepted(pdf("A"))))
    api.faults.append(unprocessable(127, "Document already exists in account."))
    assert _send(api, store) == (1, 0, 0)
    (row,) = store.audit(AuditFilter())
    assert row.delivery_id == "" and row.delivered_via == "getmyinvoices"


def test_a_crash_after_the_upload_asks_before_uploading_again(
    api: FakeGetMyInvoices, store: SqlStore
) -> None:
    api.detect_duplicates = False  # only /documents/exists can prevent a second copy
    record(store, mail(1, accepted(pdf("A"))))
    with pytest.raises(Crashed):
        _send(api, store, crash_at=CrashPoint.AFTER_SEND)
    # The crashed owner's lease runs out on the database's clock, as a user's next run
    # would find it: the default 30 s, waited for as a condition.
    wait_for_leases_to_expire(store)
    later = T0 + timedelta(hours=3)
    assert _send(api, store, now=later) == (1, 0, 0)
    assert len(api.uploads()) == 1 and len(api.documents) == 1
    assert [c.path.rsplit("/", 1)[-1] for c in api.calls].count("exists") == 1


def test_a_crash_before_the_upload_uploads_once(api: FakeGetMyInvoices, store: SqlStore) -> None:
    api.detect_duplicates = False
    record(store, mail(1, accepted(pdf("A"))))
    with pytest.raises(Crashed):
        _send(api, store, crash_at=CrashPoint.AFTER_UPLOAD_STARTED)
    assert api.uploads() == []
    wait_for_leases_to_expire(store)  # the crashed owner's lease, on the database's clock
    assert _send(api, store, now=T0 + timedelta(hours=3)) == (1, 0, 0)
    assert len(api.documents) == 1


def test_a_lost_answer_is_not_uploaded_twice(api: FakeGetMyInvoices, store: SqlStore) -> None:
    api.detect_duplicates = False
    api.drop_after_store = 1
    record(store, mail(1, accepted(pdf("A"))))
    assert _send(api, store) == (0, 1, 0)
    assert _send(api, store, now=T0 + timedelta(hours=1)) == (1, 0, 0)
    assert len(api.documents) == 1
    (row,) = store.audit(AuditFilter())
    assert row.delivery_id == ""  # GetMyInvoices had it; its uid was never heard


def test_two_stores_share_one_budget(api: FakeGetMyInvoices, database_url: str) -> None:
    migrate.upgrade_database(database_url)
    first, second = SqlStore(database_url), SqlStore(database_url)
    try:
        record(first, *(mail(n, accepted(pdf(f"doc {n}"))) for n in range(1, 9)))
        budget = Budget(uploads_per_hour=5)  # five uploads an hour, whoever sends them
        results: list[tuple[int, int, int]] = []

        def run(store: SqlStore) -> None:
            results.append(_send(api, store, budget=budget))

        threads = [threading.Thread(target=run, args=(s,)) for s in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(api.uploads()) == 5  # both spent from one hour's budget
        assert sum(r[0] for r in results) == len(api.documents) == 5
        assert len(api.documents) == len({d.sha256 for d in api.documents})
        _every_call_counted(api, first)
    finally:
        first.close()
        second.close()


def _every_call_counted(api: FakeGetMyInvoices, store: SqlStore) -> None:
    """The minute and day windows counted every call the API saw, `GET /account` too;
    the hourly upload window only the uploads."""
    with store.engine.connect() as connection:
        used = dict(
            connection.execute(sa.select(delivery_budgets.c.window, delivery_budgets.c.used)).all()
        )
    assert any(c.path.endswith("/account") for c in api.calls)  # a session's first call
    assert used[Window.MINUTE.value] == used[Window.DAY.value] == len(api.calls)
    assert used[Window.UPLOAD_HOUR.value] == len(api.uploads())


def test_resend_refuses_what_getmyinvoices_has(api: FakeGetMyInvoices, database_url: str) -> None:
    from worker.cli.maintenance import resend_through_api
    from worker.config.settings import Settings

    migrate.upgrade_database(database_url)
    store = SqlStore(database_url)
    try:
        record(store, mail(1, accepted(pdf("A"))))
        destination = _destination(api, store, now=T0)
        (document,) = store.claim_due(
            mailbox=QUEUE_MAILBOX, now=T0, limit=1, owner=OWNER, lease_seconds=60
        )
        receipt = destination.deliver(Parcel.from_outgoing(document))
        destination.close()
        store.mark_forwarded(
            document.document_id,
            owner=OWNER,
            message_id=receipt.delivery_id,
            answer=receipt.answer,
            now=T0,
            keep_pdf=True,  # resend needs the kept bytes
            via=receipt.via,
        )
    finally:
        store.close()
    settings = Settings.from_env(
        {
            "HOME": "/nonexistent",
            "INVOICE_RELAY_IMAP_HOST": "imap.example.test",
            "INVOICE_RELAY_IMAP_USER": "u",
            "INVOICE_RELAY_IMAP_PASSWORD": "p",
            "INVOICE_RELAY_DATABASE_URL": database_url,
            "INVOICE_RELAY_DELIVERY": "getmyinvoices",
            "INVOICE_RELAY_GMI_API_KEY": KEY,
            "INVOICE_RELAY_GMI_API_URL": api.url,
        }
    )
    queued, said = resend_through_api(settings, document.sha256)
    assert (queued, said) == (False, "not queued: already in GetMyInvoices")
    api.documents.clear()  # deleted in GetMyInvoices: now a resend may upload it again
    queued, said = resend_through_api(settings, document.sha256)
    assert queued, said


def _send_in_a_process(database_url: str, api_url: str) -> tuple[int, int, int]:
    """One replica: its own process, engine and HTTP client (run by a spawned worker)."""
    store = SqlStore(database_url)
    try:
        destination = GmiDestination(
            api_key=Secret(KEY),
            budget=SharedBudget(store=store, budget=Budget(uploads_per_hour=5), clock=lambda: T0),
            marks=store,
            api_url=api_url,
            timeout=5.0,
            clock=lambda: T0,
        )
        return send_loop(store, destination, now=T0, send_batch=3).forward_due()
    finally:
        store.close()


def test_two_processes_share_one_budget(api: FakeGetMyInvoices, database_url: str) -> None:
    migrate.upgrade_database(database_url)
    store = SqlStore(database_url)
    try:
        record(store, *(mail(n, accepted(pdf(f"doc {n}"))) for n in range(1, 13)))
    finally:
        store.close()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        futures = [pool.submit(_send_in_a_process, database_url, api.url) for _ in range(2)]
        results = [future.result(timeout=120) for future in futures]
    assert len(api.uploads()) == 5  # five uploads an hour, whichever process makes them
    assert sum(forwarded for forwarded, _, _ in results) == len(api.documents) == 5
    assert len({d.sha256 for d in api.documents}) == 5
    store = SqlStore(database_url)
    try:
        _every_call_counted(api, store)
    finally:
        store.close()
