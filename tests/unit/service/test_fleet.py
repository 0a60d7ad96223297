"""Fleet: many routes on a constant number of threads, each fire time claimed by one
replica. Driven with a fake claim table, a fake clock and polls that block until the
test lets them end; every wait is for a condition, bounded so a bug fails the test."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.service.fleetfakes import WAIT, BlockingPoll, FakeClock, FakeFireStore
from worker.config.schedule import parse_schedule
from worker.errors import MailboxError
from worker.service.fires import latest_fire, next_fire, route_offset
from worker.service.fleet import Fleet, RouteSchedule

T0 = datetime(2026, 6, 1, 12, 2, 30, tzinfo=UTC)  # between two fire times of `5m`
DAY = 86_400.0  # seconds: claims older than this go
FIVE = parse_schedule("5m", "UTC")
STEP = timedelta(minutes=5)


def schedules(*names: str) -> list[RouteSchedule]:
    return [RouteSchedule(name=name, spec=FIVE) for name in names]


def first_fire(name: str) -> datetime:
    fire = latest_fire(FIVE, T0, route_offset(name, FIVE))
    assert fire is not None
    return fire


def make_fleet(
    store: FakeFireStore,
    clock: FakeClock,
    poll: BlockingPoll,
    *names: str,
    owner: str = "replica-1",
    parallel: int = 8,
) -> Fleet:
    return Fleet(
        routes=schedules(*names),
        poll=poll,
        claims=store,
        owner=owner,
        max_parallel_polls=parallel,
        clock=clock,
    )


@contextmanager
def started(fleet: Fleet, poll: BlockingPoll) -> Iterator[Fleet]:
    fleet.start()
    try:
        yield fleet
    finally:
        poll.open()
        assert fleet.stop(timeout=WAIT)


def calls_and_running(calls: int, running: int) -> Callable[[BlockingPoll], bool]:
    return lambda poll: len(poll.calls) == calls and poll.running == running


def records(count: int) -> Callable[[FakeFireStore], bool]:
    return lambda store: len(store.records) == count


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "action", None) == action]


def extra(record: logging.LogRecord, name: str) -> str:
    """A field the record got through `extra=`."""
    value = getattr(record, name)
    assert isinstance(value, str)
    return value


@pytest.fixture
def store() -> FakeFireStore:
    return FakeFireStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def poll() -> Iterator[BlockingPoll]:
    blocking = BlockingPoll(started_at=T0)
    yield blocking
    blocking.open()  # no poll thread stays blocked after its test


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.service")


# --- claims ----------------------------------------------------------------------------


def test_two_replicas_poll_each_route_once_per_fire_time(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    names = ("shop-a", "shop-b", "shop-c")
    poll.open()
    first = make_fleet(store, clock, poll, *names, owner="replica-1")
    second = make_fleet(store, clock, poll, *names, owner="replica-2")
    with started(first, poll), started(second, poll):
        store.wait_for(lambda s: len(s.attempts) == 6 and len(s.records) == 3)
        clock.advance(STEP)
        store.wait_for(lambda s: len(s.attempts) == 12 and len(s.records) == 6)

    polled = Counter(poll.calls)
    assert set(polled.values()) == {1}
    assert set(polled) == {(name, first_fire(name) + k * STEP) for name in names for k in (0, 1)}
    assert Counter((a.route, a.fire_time) for a in store.attempts) == Counter(
        {key: 2 for key in polled}
    )
    # Each fire time: one replica logs poll_started, the other poll_skipped, never both.
    begun = Counter(
        (extra(r, "route"), extra(r, "fire_time")) for r in actions(caplog, "poll_started")
    )
    skipped = Counter(
        (extra(r, "route"), extra(r, "fire_time")) for r in actions(caplog, "poll_skipped")
    )
    expected = Counter({(route, fire.isoformat()): 1 for route, fire in polled})
    assert begun == expected
    assert skipped == expected
    assert {record["owner"] for record in store.records} <= {"replica-1", "replica-2"}


def test_start_up_claims_the_latest_past_fire_time(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll
) -> None:
    store.claims["shop-b", first_fire("shop-b")] = "a-peer"  # a peer did shop-b's already
    poll.open()
    fleet = make_fleet(store, clock, poll, "shop-a", "shop-b")
    with started(fleet, poll):
        store.wait_for(lambda s: len(s.attempts) == 2 and len(s.records) == 1)

    assert poll.calls == [("shop-a", first_fire("shop-a"))]
    assert first_fire("shop-a") <= T0 < first_fire("shop-a") + STEP
    assert {(a.route, a.fire_time, a.won) for a in store.attempts} == {
        ("shop-a", first_fire("shop-a"), True),
        ("shop-b", first_fire("shop-b"), False),
    }
    assert fleet.snapshot()["shop-a"].next_fire_at == first_fire("shop-a") + STEP


# --- the parallel cap and the order ----------------------------------------------------


def test_at_most_max_parallel_polls_run_and_the_rest_wait_in_fire_time_order(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll
) -> None:
    names = tuple(f"client-{index:02}" for index in range(12))
    by_fire_time = sorted(names, key=first_fire)
    assert len({first_fire(name) for name in names}) == 12  # distinct offsets: no ties
    fleet = make_fleet(store, clock, poll, *names, parallel=3)
    with started(fleet, poll):
        poll.wait_for(lambda p: p.running == 3)
        clock.wait_for_sleeper()  # every due fire time has been handed over
        assert (fleet.polls_running(), fleet.polls_waiting()) == (3, 9)
        for ended in range(1, 10):
            poll.allow(1)  # one poll ends: exactly one waiting poll takes its worker
            poll.wait_for(calls_and_running(3 + ended, 3))
            assert fleet.polls_waiting() == 9 - ended
        poll.open()
        store.wait_for(lambda s: len(s.records) == 12)

    assert poll.most_at_once == 3
    called = poll.routes_called()
    assert set(called[:3]) == set(by_fire_time[:3])  # three workers race for the first three
    assert called[3:] == by_fire_time[3:]


def test_the_thread_count_does_not_grow_with_the_routes(clock: FakeClock) -> None:
    def threads_for(route_count: int) -> int:
        store = FakeFireStore()
        poll = BlockingPoll(started_at=T0)
        poll.open()
        names = [f"client-{index:04}" for index in range(route_count)]
        before = set(threading.enumerate())
        fleet = make_fleet(store, clock, poll, *names, parallel=4)
        with started(fleet, poll):
            store.wait_for(lambda s: len(s.records) == route_count)
            return len(set(threading.enumerate()) - before)

    assert threads_for(3) == threads_for(1000) == 4 + 1  # the workers and the timer


# --- overlap, catch-up, old claims ------------------------------------------------------


def test_a_route_still_polling_or_waiting_at_its_next_fire_time_is_not_queued_twice(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet(store, clock, poll, "shop-a", "shop-b", parallel=1)
    earlier, later = sorted(("shop-a", "shop-b"), key=first_fire)
    with started(fleet, poll):
        poll.wait_for(lambda p: p.running == 1)
        clock.advance(STEP)
        clock.wait_for_sleeper()
        overlaps = {extra(record, "route"): record for record in actions(caplog, "poll_overlap")}
        assert set(overlaps) == {"shop-a", "shop-b"}
        assert "still running" in overlaps[earlier].getMessage()
        assert "waiting for a free worker" in overlaps[later].getMessage()
        assert extra(overlaps[earlier], "fire_time") == (first_fire(earlier) + STEP).isoformat()
        assert len(store.attempts) == 1  # the overlapped fire times were not claimed

        poll.open()
        store.wait_for(lambda s: len(s.records) == 2)
        clock.advance(STEP)
        store.wait_for(lambda s: len(s.records) == 4)

    assert sorted(poll.calls) == sorted(
        [(name, first_fire(name)) for name in ("shop-a", "shop-b")]
        + [(name, first_fire(name) + 2 * STEP) for name in ("shop-a", "shop-b")]
    )


def test_after_a_suspend_only_the_latest_missed_fire_time_is_polled(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    poll.open()
    fleet = make_fleet(store, clock, poll, "shop-a")
    offset = route_offset("shop-a", FIVE)
    with started(fleet, poll):
        store.wait_for(lambda s: len(s.records) == 1)
        clock.advance(timedelta(hours=1))
        store.wait_for(lambda s: len(s.records) == 2)
        clock.wait_for_sleeper()

    latest = latest_fire(FIVE, T0 + timedelta(hours=1), offset)
    assert [attempt.fire_time for attempt in store.attempts] == [first_fire("shop-a"), latest]
    assert actions(caplog, "poll_overlap") == []
    assert fleet.snapshot()["shop-a"].next_fire_at == next_fire(
        FIVE, T0 + timedelta(hours=1), offset
    )


def test_claims_older_than_a_day_are_deleted_at_most_once_an_hour(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll
) -> None:
    store.now = clock.now
    store.claims["shop-a", T0 - timedelta(days=2)] = "long-gone"
    store.claimed_at["shop-a", T0 - timedelta(days=2)] = T0 - timedelta(days=2)
    poll.open()
    fleet = make_fleet(store, clock, poll, "shop-a")
    with started(fleet, poll):
        store.wait_for(lambda s: len(s.records) == 1)
        for count in (2, 3, 4):  # half an hour on: no second deletion
            clock.advance(timedelta(minutes=10))
            store.wait_for(records(count))
            clock.wait_for_sleeper()
        assert store.forgotten == [DAY]
        assert ("shop-a", T0 - timedelta(days=2)) not in store.claims
        clock.advance(timedelta(minutes=30))  # an hour since the first
        store.wait_for(lambda s: len(s.records) == 5)
        clock.wait_for_sleeper()
        assert store.forgotten == [DAY, DAY]


# --- polls asked for by IDLE --------------------------------------------------------------


def test_poll_now_polls_without_a_claim_and_folds_requests_while_running(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet(store, clock, poll, "shop-a")
    with started(fleet, poll):
        poll.allow(1)
        store.wait_for(lambda s: len(s.records) == 1)  # the start-up poll
        fleet.poll_now("shop-a")
        poll.wait_for(lambda p: len(p.calls) == 2)
        fleet.poll_now("shop-a")  # while it runs: once more after it
        fleet.poll_now("shop-a")
        poll.allow(1)
        poll.wait_for(lambda p: len(p.calls) == 3)
        assert fleet.polls_waiting() == 0  # two requests, one more poll
        poll.open()
        store.wait_for(lambda s: len(s.records) == 3)
        clock.advance(STEP)
        store.wait_for(lambda s: len(s.records) == 4)
        with pytest.raises(KeyError, match="nobody"):
            fleet.poll_now("nobody")

    assert [fire for _, fire in poll.calls] == [
        first_fire("shop-a"),
        T0,
        T0,
        first_fire("shop-a") + STEP,
    ]
    assert len(store.attempts) == 2  # the two fire times only
    triggers = [extra(record, "trigger") for record in actions(caplog, "poll_started")]
    assert triggers == ["schedule", "new_mail", "new_mail", "schedule"]
    assert actions(caplog, "poll_overlap") == []


# --- what came of a poll -----------------------------------------------------------------


def metric(fleet: Fleet, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(fleet.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_each_poll_is_recorded_with_its_outcome(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    poll.failures["shop-a"] = MailboxError("connection refused", host="imap.example", port=993)
    poll.failures["shop-c"] = RuntimeError("password=hunter2")
    poll.open()
    fleet = make_fleet(store, clock, poll, "shop-a", "shop-b", "shop-c")
    with started(fleet, poll):
        store.wait_for(lambda s: len(s.records) == 3)

    records = {record["route"]: record for record in store.records}
    assert records["shop-a"]["ok"] is False
    assert "imap.example:993" in str(records["shop-a"]["error"])
    assert records["shop-b"] == {
        "route": "shop-b",
        "ok": True,
        "summary": "2 mails seen, 1 forwarded, 3 pending, 1 failed",
        "error": None,
        "owner": "replica-1",
    }
    assert records["shop-c"]["error"] == "unexpected RuntimeError (see the log)"
    assert {extra(record, "route") for record in actions(caplog, "poll_failed")} == {
        "shop-a",
        "shop-c",
    }

    outcomes = fleet.snapshot()
    assert outcomes["shop-a"].last_success_at is None
    assert outcomes["shop-a"].polls_finished == 1
    assert outcomes["shop-b"].last_success_at == T0 + timedelta(seconds=1)
    assert (outcomes["shop-b"].pending, outcomes["shop-b"].failed) == (3, 1)
    assert outcomes["shop-b"].last_fire_time == first_fire("shop-b")
    assert metric(fleet, "invoice_relay_polls_total", route="shop-a", result="error") == 1
    assert metric(fleet, "invoice_relay_polls_total", route="shop-b", result="ok") == 1
    assert metric(fleet, "invoice_relay_forwards_total", route="shop-b") == 1
    assert metric(fleet, "invoice_relay_poll_start_delay_seconds_count") == 3


def test_a_database_that_refuses_claims_means_no_poll(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    store.unavailable = True
    poll.open()
    fleet = make_fleet(store, clock, poll, "shop-a")
    fleet.start()
    store.wait_for(lambda s: s.refused == 2)  # the old claims' deletion, the claim
    assert fleet.stop(timeout=WAIT)  # once the claim's worker is done

    assert poll.calls == []
    assert [extra(record, "route") for record in actions(caplog, "claim_failed")] == ["shop-a"]
    assert len(actions(caplog, "claims_kept")) == 1
    assert fleet.snapshot()["shop-a"].last_error is not None
    assert metric(fleet, "invoice_relay_polls_total", route="shop-a", result="error") == 1


# --- stopping ----------------------------------------------------------------------------


def test_stop_returns_within_its_timeout_while_polls_block(
    store: FakeFireStore, clock: FakeClock, poll: BlockingPoll, caplog: pytest.LogCaptureFixture
) -> None:
    before = set(threading.enumerate())
    fleet = make_fleet(store, clock, poll, "shop-a", "shop-b", "shop-c", parallel=2)
    fleet.start()
    ours = set(threading.enumerate()) - before
    poll.wait_for(lambda p: p.running == 2)
    assert fleet.alive()

    # A short timeout on purpose: what is tested is that stop() is bounded by it and
    # does not wait for polls stuck on a server (`run` passes 8 s, under the 10 s promised).
    began = time.monotonic()
    assert fleet.stop(timeout=0.2) is False
    assert time.monotonic() - began < WAIT
    assert not fleet.alive()
    assert len(actions(caplog, "poll_abandoned")) == 1
    fleet.poll_now("shop-a")  # ignored once stopping
    assert fleet.polls_waiting() == 0  # the third route's fire time was dropped unclaimed

    poll.open()
    assert fleet.stop(timeout=WAIT) is True
    for thread in ours:
        thread.join(WAIT)
    assert [thread for thread in ours if thread.is_alive()] == []
    assert len(poll.calls) == 2
    assert len(store.attempts) == 2


def test_settings_a_fleet_refuses() -> None:
    store, clock, poll = FakeFireStore(), FakeClock(T0), BlockingPoll(started_at=T0)
    with pytest.raises(ValueError, match="at least 1"):
        make_fleet(store, clock, poll, "shop-a", parallel=0)
    with pytest.raises(ValueError, match="unique"):
        make_fleet(store, clock, poll, "shop-a", "shop-a")
    fleet = make_fleet(store, clock, poll, "shop-a")
    assert not fleet.alive()  # not started
    poll.open()
    with started(fleet, poll), pytest.raises(RuntimeError, match="already"):
        fleet.start()


def test_a_fleet_without_routes_starts_and_stops(clock: FakeClock, poll: BlockingPoll) -> None:
    store = FakeFireStore()
    fleet = make_fleet(store, clock, poll)
    with started(fleet, poll):
        store.wait_for(lambda s: len(s.forgotten) == 1)
        assert fleet.alive()
    assert fleet.snapshot() == {}
