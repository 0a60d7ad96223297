"""SqlStore's status-page reads (`PageReader`) and sessions (`WebSessionStore`), against
SQLite and PostgreSQL (`integration`)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.documents import OWNER, QUEUE_MAILBOX
from tests.storecases import T0, StoreFactory, accepted, mail, pdf, record
from worker.models import (
    AttemptOutcome,
    AuditSearch,
    DocumentState,
    Outcome,
    PartRecord,
    RouteScope,
    SightingKind,
)
from worker.store.sqlstore import SqlStore

EVERYONE = RouteScope.everything()
ELSEWHERE = RouteScope.of(["shop-b"])  # the rows above are route `default`


@pytest.fixture
def store(store_factory: StoreFactory) -> SqlStore:
    store = store_factory()
    record(
        store,
        mail(1, accepted(pdf("a"), invoice_number="1042", filename="=cmd.pdf")),
        mail(2, accepted(pdf("a"), invoice_number="1042")),
        mail(3, PartRecord(part="2", kind=SightingKind.REJECTED, reason="not a PDF")),
        now=T0,
        advance_to=3,
    )
    record(
        store,
        mail(4, accepted(pdf("b"), filename="Rechnung_100%.pdf")),
        now=T0 + timedelta(days=40),
    )
    due = store.claim_due(
        mailbox=QUEUE_MAILBOX, now=T0 + timedelta(days=40), limit=10, owner=OWNER, lease_seconds=60
    )
    store.mark_failed(due[1].document_id, owner=OWNER, answer="554 5.7.1 refused")
    store.mark_forwarded(
        due[0].document_id,
        owner=OWNER,
        message_id="<out@relay>",
        answer="250 ok",
        now=T0,
        keep_pdf=True,
    )
    return store


def test_search_filters_pages_and_counts(store: SqlStore) -> None:
    everything = store.search_audit(AuditSearch(scope=EVERYONE))
    assert [row.uid for row in everything.rows] == [4, 3, 2, 1] and everything.total == 4
    by_invoice = store.search_audit(AuditSearch(scope=EVERYONE, invoice_number="1042"))
    assert [row.uid for row in by_invoice.rows] == [2, 1]
    # LIKE's wildcards in a search are literal text
    assert [
        r.uid for r in store.search_audit(AuditSearch(scope=EVERYONE, filename="100%")).rows
    ] == [4]
    assert store.search_audit(AuditSearch(scope=EVERYONE, filename="_")).total == 1
    assert store.search_audit(AuditSearch(scope=EVERYONE, sender="SHOP@")).total == 4
    failed = store.search_audit(AuditSearch(scope=EVERYONE, outcomes=(Outcome.FAILED,)))
    assert [row.uid for row in failed.rows] == [4]
    dated = store.search_audit(AuditSearch(scope=EVERYONE, received_from=T0 + timedelta(days=1)))
    assert [row.uid for row in dated.rows] == [4]
    second = store.search_audit(AuditSearch(scope=EVERYONE, offset=1, limit=2))
    assert [row.uid for row in second.rows] == [3, 2] and second.total == 4
    assert store.search_audit(AuditSearch(scope=EVERYONE, route="default")).total == 4


def test_another_routes_user_sees_nothing(store: SqlStore) -> None:
    page = store.search_audit(AuditSearch(scope=ELSEWHERE))
    assert (page.rows, page.total) == ((), 0)
    first = store.search_audit(AuditSearch(scope=EVERYONE)).rows[-1]
    assert store.document_story(first.id, ELSEWHERE) is None
    assert store.document_pdf(first.id, ELSEWHERE) is None
    assert store.route_overviews(ELSEWHERE, T0) == []


def test_a_documents_story_holds_its_sightings_and_delivery(store: SqlStore) -> None:
    rows = {row.uid: row for row in store.search_audit(AuditSearch(scope=EVERYONE)).rows}
    story = store.document_story(rows[2].id, EVERYONE)  # the duplicate's page
    assert story is not None
    assert story.row.duplicate_of == rows[1].id
    assert story.state is DocumentState.FORWARDED
    assert story.forwarded_message_id == "<out@relay>"
    assert (story.delivered_via, story.delivery_id) == ("smtp", "<out@relay>")
    assert [(a.outcome, a.answer, a.via) for a in story.attempt_history] == [
        (AttemptOutcome.FORWARDED, "250 ok", "smtp")
    ]
    assert [seen.uid for seen in story.sightings] == [1, 2]
    assert story.pdf_kept
    assert store.document_pdf(rows[1].id, EVERYONE) == ("=cmd.pdf", pdf("a"))
    failed = store.document_story(rows[4].id, EVERYONE)
    assert failed is not None and failed.state is DocumentState.FAILED
    assert failed.last_answer == "554 5.7.1 refused"
    assert [(a.outcome, a.answer) for a in failed.attempt_history] == [
        (AttemptOutcome.FAILED, "554 5.7.1 refused")
    ]
    rejected = store.document_story(rows[3].id, EVERYONE)
    assert rejected is not None and rejected.document_id is None
    assert rejected.attempt_history == ()
    assert store.document_story(10_000, EVERYONE) is None


def test_a_document_delivered_to_getmyinvoices_names_its_document_uid(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    (seen,) = record(store, mail(1, accepted(pdf("a"))))
    (claimed,) = store.claim_due(
        mailbox=QUEUE_MAILBOX, now=T0, limit=10, owner=OWNER, lease_seconds=60
    )
    store.mark_forwarded(
        claimed.document_id,
        owner=OWNER,
        message_id="4711",
        answer="200 documentUid 4711",
        now=T0,
        keep_pdf=False,
        via="getmyinvoices",
    )
    story = store.document_story(seen.sighting_id, EVERYONE)
    assert story is not None
    assert (story.delivered_via, story.delivery_id, story.forwarded_message_id) == (
        "getmyinvoices",
        "4711",
        None,
    )
    assert [(a.outcome, a.via) for a in story.attempt_history] == [
        (AttemptOutcome.FORWARDED, "getmyinvoices")
    ]


def test_the_overview_counts_today_and_this_month(store: SqlStore) -> None:
    (overview,) = store.route_overviews(EVERYONE, T0 + timedelta(days=40, hours=1))
    assert overview.route == "default"
    assert overview.today[Outcome.FAILED] == 1
    assert overview.month[Outcome.FORWARDED] == 0
    assert [item.last_answer for item in overview.failed] == ["554 5.7.1 refused"]
    assert overview.waiting == ()
    assert overview.mailboxes


def test_sessions_end_on_logout_and_when_idle(store: SqlStore) -> None:
    store.start_session(token_hash="h1", user="accountant", csrf_token="c1", now=T0)
    store.start_session(token_hash="h2", user="accountant", csrf_token="c2", now=T0)
    live = store.live_session(token_hash="h1", now=T0 + timedelta(seconds=50), idle_seconds=60)
    assert live is not None and (live.user, live.csrf_token) == ("accountant", "c1")
    # seen at +50: still alive at +100, while h2 (last seen at 0) has expired
    assert store.live_session(token_hash="h1", now=T0 + timedelta(seconds=100), idle_seconds=60)
    assert (
        store.live_session(token_hash="h2", now=T0 + timedelta(seconds=100), idle_seconds=60)
        is None
    )
    store.end_session(token_hash="h1")
    assert (
        store.live_session(token_hash="h1", now=T0 + timedelta(seconds=101), idle_seconds=60)
        is None
    )


def test_routes_scope_rows_documents_and_overviews(store_factory: StoreFactory) -> None:
    store = store_factory()
    second = "second@imap.example/INBOX"
    record(store, mail(1, accepted(pdf("a"))), route="shop-a", advance_to=1)
    (b,) = record(store, mail(1, accepted(pdf("b"))), mailbox=second, route="shop-b", advance_to=1)
    (b_again,) = record(
        store, mail(2, accepted(pdf("b"))), mailbox=second, route="shop-b", advance_to=2
    )
    only_b = RouteScope.of(["shop-b"])
    page = store.search_audit(AuditSearch(scope=only_b))
    assert {(row.route, row.uid) for row in page.rows} == {("shop-b", 1), ("shop-b", 2)}
    assert store.search_audit(AuditSearch(scope=EVERYONE, route="shop-a")).total == 1
    assert store.search_audit(AuditSearch(scope=only_b, route="shop-a")).total == 0
    story = store.document_story(b_again.sighting_id, only_b)
    assert story is not None and story.route == "shop-b" and len(story.sightings) == 2
    shop_a_row = store.search_audit(AuditSearch(scope=EVERYONE, route="shop-a")).rows[0]
    assert store.document_story(shop_a_row.id, only_b) is None
    assert store.document_pdf(b.sighting_id, only_b) == ("invoice.pdf", pdf("b"))
    assert store.document_pdf(shop_a_row.id, only_b) is None
    overviews = {o.route: o for o in store.route_overviews(EVERYONE, T0 + timedelta(hours=1))}
    assert set(overviews) == {"shop-a", "shop-b"}
    assert overviews["shop-b"].mailboxes == (second,)
    assert [queued.sighting_id for queued in overviews["shop-b"].waiting] == [b.sighting_id]
    assert overviews["shop-a"].today[Outcome.PENDING] == 1
    assert [o.route for o in store.route_overviews(only_b, T0)] == ["shop-b"]
