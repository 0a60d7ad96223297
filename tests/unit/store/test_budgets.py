"""The API budgets' rows on SQLite and PostgreSQL (`integration`): stamped with the
database's clock, shared by replicas whose own clocks disagree, and never moved back
by a replica that read the clock a moment earlier."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.servers.getmyinvoices import ACCOUNT_ID
from tests.storecases import StoreFactory
from worker.cli.wiring import gmi_budget
from worker.config.environment import Secret
from worker.config.settings import Settings
from worker.delivery.getmyinvoices import GmiDestination
from worker.errors import DeliveryThrottled
from worker.models import Parcel
from worker.relay.budget import Budget, SharedBudget, Window
from worker.store.engine import create_schema
from worker.store.schema import delivery_budgets
from worker.store.sqlstore import SqlStore

DESTINATION = f"getmyinvoices:{ACCOUNT_ID}"
SKEW = timedelta(seconds=45)  # one replica's clock runs this far ahead of the other's


def _windows(store: SqlStore) -> dict[str, tuple[datetime, int]]:
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(delivery_budgets)).all()
    return {row.window: (row.window_start, row.used) for row in rows}


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _room_in_this_minute(store: SqlStore, *, seconds: float) -> datetime:
    """Wait until the database's clock has `seconds` left in its minute (the test's calls
    must fall in one window of that clock, which no test can set); its time then."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = store.database_now()
        if now.second + now.microsecond / 1e6 <= 60 - seconds:
            return now
        time.sleep(0.2)  # polling the database's clock for the next minute
    raise AssertionError("the database's clock did not reach a new minute")


def _replica(store: SqlStore, *, skew: timedelta, budget: Budget) -> GmiDestination:
    """One replica: its own engine, budget object and HTTP client, and a clock of its own
    that is `skew` off this host's; the database is the only thing shared."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/account"):
            return httpx.Response(200, json={"accountId": ACCOUNT_ID, "name": "Shop"})
        return httpx.Response(200, json={"success": True, "documentUid": 1})

    return GmiDestination(
        api_key=Secret("key"),
        budget=SharedBudget(store=store, budget=budget),  # as wired: the store's clock
        marks=store,
        api_url="https://gmi.test/accounts/v3",
        clock=lambda: datetime.now(UTC) + skew,
        transport=httpx.MockTransport(answer),
    )


def _parcel(n: int) -> Parcel:
    return Parcel(
        sha256=f"{n:064x}",
        content=f"%PDF-1.4 invoice {n}".encode(),
        filename=f"RE-{n}.pdf",
        resend_count=0,
        original_sender="shop@example.test",
        original_subject="Invoice",
        original_date=None,
        original_message_id=f"<{n}@shop.example>",
    )


def test_replicas_with_skewed_clocks_share_the_databases_minute(
    store_factory: StoreFactory,
) -> None:
    first, second = store_factory(), store_factory()
    budget = Budget(calls_per_minute=4)
    steady = _replica(first, skew=timedelta(0), budget=budget)
    skewed = _replica(second, skew=SKEW, budget=budget)
    # Both replicas' calls take a few database round trips; 15 s is ample room.
    started = _room_in_this_minute(first, seconds=15)
    steady.deliver(_parcel(1))  # GET /account, then the upload
    skewed.deliver(_parcel(2))
    with pytest.raises(DeliveryThrottled) as raised:
        skewed.deliver(_parcel(3))
    ended = second.database_now()
    assert _minute(ended) == _minute(started)  # the test stayed in one minute
    assert "calls-per-minute" in raised.value.limit
    # Until the database's next minute, measured on its clock: the skewed replica's own
    # would make it 45 s shorter.
    assert 60 - ended.second - 1 <= raised.value.retry_after_seconds <= 60 - started.second
    windows = _windows(first)
    assert windows[Window.MINUTE.value] == (_minute(started), 4)
    assert windows[Window.DAY.value] == (_minute(started).replace(hour=0, minute=0), 4)
    assert windows[Window.UPLOAD_HOUR.value][1] == 2  # only the uploads: not the accounts


def test_a_window_never_goes_back(store_factory: StoreFactory) -> None:
    # A replica that read the clock just before another began the next minute gets the
    # lock after it: its call counts in the newer minute, which stays.
    store = store_factory()
    later = store.database_now().replace(microsecond=0) + timedelta(minutes=5)
    SharedBudget(store=store, budget=Budget(), clock=lambda: later).spend(DESTINATION, upload=False)
    earlier = later - timedelta(seconds=61)
    SharedBudget(store=store, budget=Budget(), clock=lambda: earlier).spend(
        DESTINATION, upload=False
    )
    assert _windows(store)[Window.MINUTE.value] == (_minute(later), 2)


class _DatabaseAhead(SqlStore):
    """A database whose clock is three hours ahead of this host's."""

    def database_now(self) -> datetime:
        return super().database_now() + timedelta(hours=3)


def test_the_wired_budget_stamps_the_databases_clock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    settings = Settings.from_env(
        {
            "HOME": "/nonexistent",
            "INVOICE_RELAY_IMAP_HOST": "imap.example.test",
            "INVOICE_RELAY_IMAP_USER": "u",
            "INVOICE_RELAY_IMAP_PASSWORD": "p",
            "INVOICE_RELAY_DATABASE_URL": url,
            "INVOICE_RELAY_DELIVERY": "getmyinvoices",
            "INVOICE_RELAY_GMI_API_KEY": "key",
        }
    )
    store = _DatabaseAhead(url)
    try:
        create_schema(store.engine)
        before = store.database_now()
        assert gmi_budget(settings, store).spend(DESTINATION, upload=True) is None
        after = store.database_now()
        start, used = _windows(store)[Window.UPLOAD_HOUR.value]
    finally:
        store.close()
    # The database's hour, three hours from this host's.
    assert before.replace(minute=0, second=0, microsecond=0) <= start <= after
    assert used == 1
