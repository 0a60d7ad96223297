"""A limit of the destination (`DeliveryThrottled`): the document waits, uncounted,
until the limit allows; holding the others is the budget's (worker.relay.budget)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.documents import add_pending_documents, send_loop
from tests.fakes import FakeOutbox, FakeStore
from worker.errors import DeliveryDeferred, DeliveryThrottled
from worker.models import DocumentState

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def test_a_throttled_document_waits_uncounted() -> None:
    store = FakeStore()
    first, second = add_pending_documents(store, 2, now=NOW)
    outbox = FakeOutbox()
    outbox.answers = [
        DeliveryThrottled("HTTP 503", retry_after_seconds=300, limit="the API's availability")
    ]
    forwarded, later, failed = send_loop(store, outbox, now=NOW, send_batch=5).forward_due()
    assert (forwarded, failed) == (1, 0) and later == 1  # the next one had its own session
    held = next(d for d in store.documents.values() if d.sha256 == first)
    assert held.state is DocumentState.PENDING
    assert held.attempts == 0
    assert held.next_attempt_at == NOW + timedelta(seconds=300)
    assert "the API's availability" in (held.last_answer or "")
    assert "resumes 2026-12-01 10:05 UTC" in (held.last_answer or "")
    assert outbox.sent_hashes() == [second]


def test_a_deferral_still_counts() -> None:
    store = FakeStore()
    add_pending_documents(store, 1, now=NOW)
    outbox = FakeOutbox()
    outbox.answers = [DeliveryDeferred("HTTP 422 code 100")]
    send_loop(store, outbox, now=NOW, send_batch=5).forward_due()
    (document,) = store.documents.values()
    assert document.attempts == 1
