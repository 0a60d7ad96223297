"""The shared API budgets (worker.relay.budget): stamped with the database's clock, so
that replicas whose own clocks disagree spend from one window and wait for one hold;
`GET /account` counted as a call, not as an upload."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.servers.getmyinvoices import ACCOUNT_ID
from worker.config.environment import Secret
from worker.delivery.getmyinvoices import GmiDestination
from worker.errors import DeliveryThrottled
from worker.models import Parcel
from worker.relay.budget import Budget, SharedBudget, Window

DESTINATION = f"getmyinvoices:{ACCOUNT_ID}"
# The database's clock: 50 s into a minute. The skewed replica's says 45 s more, which
# on its own clock is the next minute.
DATABASE_NOW = datetime(2026, 12, 1, 10, 30, 50, tzinfo=UTC)
SKEW = timedelta(seconds=45)


class _Database:
    """The budget rows and the clock of one database, as `worker.store.budgets` keeps them."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.rows: dict[str, tuple[datetime, int]] = {}
        self.hold: tuple[datetime, str] | None = None

    def database_now(self) -> datetime:
        return self.now

    def spend_budget(
        self,
        destination: str,
        *,
        starts: Mapping[str, datetime],
        allow: Callable[[Mapping[str, int], datetime | None, str], bool],
    ) -> bool:
        assert destination == DESTINATION
        used = {
            name: self.rows[name][1] if self.rows.get(name, (None, 0))[0] == start else 0
            for name, start in starts.items()
        }
        held_until, held_for = self.hold or (None, "")
        if not allow(used, held_until, held_for):
            return False
        for name, start in starts.items():
            self.rows[name] = (start, used[name] + 1)
        return True

    def hold_budget(self, destination: str, *, until: datetime, limit: str) -> None:
        if self.hold is None or self.hold[0] < until:
            self.hold = (until, limit)


def _replica(
    database: _Database, *, skew: timedelta, budget: Budget, calls: list[str]
) -> GmiDestination:
    """One replica: its own budget object and HTTP client, and its own clock (off by
    `skew` from the database's); only the database is shared."""

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path.rsplit("/", 1)[-1])
        if request.url.path.endswith("/account"):
            return httpx.Response(200, json={"accountId": ACCOUNT_ID, "name": "Shop"})
        return httpx.Response(200, json={"success": True, "documentUid": len(calls)})

    return GmiDestination(
        api_key=Secret("key"),
        budget=SharedBudget(store=database, budget=budget),  # no clock: the database's
        marks=_NoMarks(),
        api_url="https://gmi.test/accounts/v3",
        clock=lambda: database.now + skew,
        transport=httpx.MockTransport(answer),
    )


class _NoMarks:
    def mark_upload_started(
        self, sha256: str, *, now: datetime, destination: str | None = None
    ) -> None:
        del sha256, now, destination


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


def test_replicas_with_skewed_clocks_share_one_minute() -> None:
    database = _Database(DATABASE_NOW)
    calls: list[str] = []
    budget = Budget(calls_per_minute=4)
    steady = _replica(database, skew=timedelta(0), budget=budget, calls=calls)
    skewed = _replica(database, skew=SKEW, budget=budget, calls=calls)
    steady.deliver(_parcel(1))  # GET /account, then the upload: two calls
    skewed.deliver(_parcel(2))  # two more, in the same minute of the database's
    assert calls == ["account", "documents", "account", "documents"]
    assert database.rows[Window.MINUTE.value] == (DATABASE_NOW.replace(second=0), 4)
    # Had the skewed replica stamped its own clock, it would have begun the next minute
    # with a fresh budget. It waits, like the other, for the database's next minute.
    for replica in (skewed, steady):
        with pytest.raises(DeliveryThrottled) as raised:
            replica.deliver(_parcel(3))
        assert "calls-per-minute" in raised.value.limit
        # 10 s on the database's clock; the skewed clock would make it "already over".
        assert raised.value.retry_after_seconds == 10.0
    assert len(calls) == 4  # neither sent anything more
    database.now += timedelta(seconds=10)
    skewed.deliver(_parcel(3))
    assert database.rows[Window.MINUTE.value] == (DATABASE_NOW.replace(minute=31, second=0), 1)


def test_a_hold_the_api_asked_for_is_on_the_databases_clock() -> None:
    database = _Database(DATABASE_NOW)
    shared = SharedBudget(store=database, budget=Budget())
    until = shared.hold(DESTINATION, seconds=60, limit="the API's minute or day call limit")
    assert until == DATABASE_NOW + timedelta(seconds=60)
    hold = shared.spend(DESTINATION, upload=False)
    assert hold is not None and hold.seconds == 60.0
    database.now = until
    assert shared.spend(DESTINATION, upload=False) is None


def test_the_account_call_counts_as_a_call_not_as_an_upload() -> None:
    database = _Database(DATABASE_NOW)
    shared = SharedBudget(store=database, budget=Budget(calls_per_minute=1))
    shared.count(DESTINATION)
    assert database.rows[Window.MINUTE.value][1] == 1
    assert database.rows[Window.DAY.value][1] == 1
    assert Window.UPLOAD_HOUR.value not in database.rows
    # A call already made is counted even past the limit: the API counted it too.
    shared.count(DESTINATION)
    assert database.rows[Window.MINUTE.value][1] == 2
    hold = shared.spend(DESTINATION, upload=True)
    assert hold is not None and "calls-per-minute" in hold.limit


def test_an_explicit_clock_still_stands_in_for_the_databases() -> None:
    # Tests that move time forward pass their own; nothing else does.
    database = _Database(DATABASE_NOW)
    later = DATABASE_NOW + timedelta(hours=2)
    SharedBudget(store=database, budget=Budget(), clock=lambda: later).spend(
        DESTINATION, upload=True
    )
    assert database.rows[Window.UPLOAD_HOUR.value] == (later.replace(minute=0, second=0), 1)
