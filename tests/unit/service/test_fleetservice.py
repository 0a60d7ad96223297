"""FleetService: `/healthz` per route from every replica's polls, `/metrics` with the
route label, and a stop that ends `run` while polls block. HTTP is real (loopback)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.service.fleetfakes import WAIT, BlockingPoll, FakeClock, FakeFireStore
from worker.config.schedule import parse_schedule
from worker.models import RoutePollState
from worker.service.fleet import Fleet, RouteSchedule
from worker.service.fleetservice import FleetService
from worker.service.health import HealthStatus, UnknownRoute

T0 = datetime(2026, 6, 1, 12, 2, 30, tzinfo=UTC)
FIVE = parse_schedule("5m", "UTC")
WINDOW = 960.0  # three intervals and a minute
NAMES = ("shop-a", "shop-b", "shop-c")


@dataclass
class Rig:
    store: FakeFireStore
    clock: FakeClock
    poll: BlockingPoll
    fleet: Fleet
    service: FleetService


@pytest.fixture
def rig() -> Iterator[Rig]:
    store, clock, poll = FakeFireStore(), FakeClock(T0), BlockingPoll(started_at=T0)
    fleet = Fleet(
        routes=[RouteSchedule(name=name, spec=FIVE) for name in NAMES],
        poll=poll,
        claims=store,
        owner="replica-1",
        clock=clock,
    )
    service = FleetService(
        fleet=fleet,
        polls=store,
        healthy_after=dict.fromkeys(NAMES, WINDOW),
        http_port=0,
        stop_event=threading.Event(),
        clock=clock.now,
    )
    yield Rig(store=store, clock=clock, poll=poll, fleet=fleet, service=service)
    poll.open()
    fleet.stop(timeout=WAIT)


def polled(route: str, *, age: float, ok: bool = True, owner: str = "replica-2") -> RoutePollState:
    finished = T0 - timedelta(seconds=age)
    return RoutePollState(
        route=route,
        last_started_at=finished - timedelta(seconds=1),
        last_finished_at=finished,
        last_success_at=finished if ok else None,
        last_result="1 mails seen, 0 forwarded, 0 pending, 0 failed" if ok else "failed",
        last_error=None if ok else "The IMAP server could not be used: down",
        owner=owner,
    )


def test_pending_documents_of_a_removed_route_are_listed_but_do_not_fail_the_probe(
    rig: Rig,
) -> None:
    left: list[tuple[str, int]] = [("smtp:inbox-9@gmi.example", 3)]
    service = FleetService(
        fleet=rig.fleet,
        polls=rig.store,
        healthy_after=dict.fromkeys(NAMES, WINDOW),
        http_port=0,
        stop_event=threading.Event(),
        clock=rig.clock.now,
        orphans=lambda: left,
    )
    rig.fleet.start()
    rig.store.states = {name: polled(name, age=60) for name in NAMES}
    verdict, body = service.health()
    assert verdict.status is HealthStatus.OK
    assert body["orphaned"] == [{"destination": "smtp:inbox-9@gmi.example", "pending": 3}]
    left.clear()
    assert "orphaned" not in service.health()[1]


def test_a_route_polled_by_another_replica_is_healthy_here(rig: Rig) -> None:
    rig.fleet.start()
    rig.store.states = {name: polled(name, age=60) for name in NAMES}
    verdict, body = rig.service.health()
    assert verdict.status is HealthStatus.OK
    assert body == {"status": "ok", "routes": 3, "healthy": 3, "unhealthy": []}


def test_unhealthy_routes_are_listed_and_the_answer_stays_200(rig: Rig) -> None:
    rig.fleet.start()
    rig.store.states = {
        "shop-a": polled("shop-a", age=60),
        "shop-b": polled("shop-b", age=5000),
        "shop-c": polled("shop-c", age=10, ok=False),
    }
    verdict, body = rig.service.health()
    assert verdict.status is HealthStatus.DEGRADED
    assert verdict.ok
    assert body["reason"] == "2 of 3 routes unhealthy"
    unhealthy = body["unhealthy"]
    assert isinstance(unhealthy, list)
    assert [entry["route"] for entry in unhealthy] == ["shop-b", "shop-c"]
    assert unhealthy[1]["last_error"] == "The IMAP server could not be used: down"


def test_one_route_is_judged_with_this_replicas_view_added(rig: Rig) -> None:
    rig.poll.open()
    rig.fleet.start()
    rig.store.wait_for(lambda s: len(s.records) == 3)
    rig.store.states["shop-b"] = polled("shop-b", age=5000)  # a later replica's failure
    verdict, body = rig.service.health("shop-a")
    assert verdict.status is HealthStatus.OK
    assert body["route"] == "shop-a"
    assert body["polled_by"] == "replica-1"
    assert (body["pending"], body["failed"]) == (3, 1)
    assert isinstance(body["next_fire"], str)
    assert datetime.fromisoformat(body["next_fire"]) > T0
    stale, stale_body = rig.service.health("shop-b")
    assert stale.status is HealthStatus.STALE
    assert not stale.ok
    assert "5000 s" in str(stale_body["reason"])
    with pytest.raises(UnknownRoute):
        rig.service.health("nobody")


def test_a_database_out_of_reach_is_503_for_the_process_and_each_route(rig: Rig) -> None:
    rig.fleet.start()
    rig.store.states = {name: polled(name, age=60) for name in NAMES}
    rig.store.unavailable = True
    verdict, body = rig.service.health()
    assert verdict.status is HealthStatus.UNAVAILABLE
    assert "database unreachable" in str(body["reason"])
    route_verdict, route_body = rig.service.health("shop-a")
    assert not route_verdict.ok
    assert route_body["status"] == "unavailable"


def test_a_scheduler_not_running_is_503(rig: Rig) -> None:
    rig.store.states = {name: polled(name, age=60) for name in NAMES}
    verdict, body = rig.service.health()  # never started
    assert verdict.status is HealthStatus.UNAVAILABLE
    assert body["reason"] == "scheduler not running"
    assert rig.service.liveness() == (False, "scheduler not running")


def test_a_fresh_process_is_starting_then_stale_without_polls(rig: Rig) -> None:
    rig.fleet.start()
    assert rig.service.health()[0].status is HealthStatus.STARTING
    rig.clock.advance(timedelta(seconds=WINDOW + 1))
    assert rig.service.health()[0].status is HealthStatus.STALE


def test_every_route_needs_a_health_window(rig: Rig) -> None:
    with pytest.raises(ValueError, match="shop-c"):
        FleetService(
            fleet=rig.fleet,
            polls=rig.store,
            healthy_after={"shop-a": WINDOW, "shop-b": WINDOW},
            http_port=0,
            stop_event=threading.Event(),
        )


# --- run() ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def get(port: int, path: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_run_serves_per_route_health_and_metrics_and_stops_while_polls_block() -> None:
    store, clock, poll = FakeFireStore(), FakeClock(T0), BlockingPoll(started_at=T0)
    fleet = Fleet(
        routes=[RouteSchedule(name=name, spec=FIVE) for name in NAMES],
        poll=poll,
        claims=store,
        owner="replica-1",
        clock=clock,
    )
    stop = threading.Event()
    port = free_port()
    service = FleetService(
        fleet=fleet,
        polls=store,
        healthy_after=dict.fromkeys(NAMES, WINDOW),
        http_port=port,
        http_host="127.0.0.1",
        stop_event=stop,
        # Short on purpose: the property is that run() ends after a stop although polls
        # hang; `run` uses 8 s, and the shutdown watchdog ends the process at 8.5 s.
        shutdown_timeout=0.2,
        clock=clock.now,
    )
    outcome: list[int] = []
    runner = threading.Thread(target=lambda: outcome.append(service.run()), daemon=True)
    runner.start()
    try:
        poll.allow(2)  # two routes' polls end; the third stays stuck on its server
        store.wait_for(lambda s: len(s.records) == 2)
        assert service.started.wait(WAIT)
        assert get(port, "/livez") == (200, b"ok\n")
        status, body = get(port, "/healthz")
        assert status == 200
        health = json.loads(body)
        assert (health["status"], health["healthy"]) == ("degraded", 2)
        stuck = health["unhealthy"][0]["route"]
        status, body = get(port, f"/healthz?route={stuck}")
        assert (status, json.loads(body)["status"]) == (503, "starting")
        assert get(port, "/healthz?route=nobody")[0] == 404
        status, metrics = get(port, "/metrics")
        assert status == 200
        for name in NAMES:
            assert f'invoice_relay_polls_total{{result="ok",route="{name}"}}'.encode() in metrics
        service.handle_signal(signal.SIGTERM, None)  # what SIGTERM calls in the main thread
        assert stop.is_set()
        runner.join(WAIT)
        assert not runner.is_alive()
        assert outcome == [0]
    finally:
        poll.open()
        stop.set()
