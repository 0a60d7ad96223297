"""The status page's overview line in `run` with a routes file (worker.cli.fleetrun)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from worker.cli.fleetrun import poll_status
from worker.models import RoutePollState
from worker.service.routepoll import RouteOutcome

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)


def state(route: str, *, finished: datetime, error: str | None = None) -> RoutePollState:
    return RoutePollState(
        route=route,
        last_started_at=finished - timedelta(seconds=1),
        last_finished_at=finished,
        last_success_at=None if error else finished,
        last_result="failed" if error else "ok",
        last_error=error,
        owner="replica-1",
    )


class Polls:
    def __init__(self, states: dict[str, RoutePollState]) -> None:
        self.states = states

    def route_polls(self) -> dict[str, RoutePollState]:
        return self.states


class Fleet:
    def __init__(self, outcomes: Mapping[str, RouteOutcome]) -> None:
        self.outcomes = outcomes

    def snapshot(self) -> Mapping[str, RouteOutcome]:
        return self.outcomes


def test_the_overview_names_the_latest_poll_the_latest_error_and_the_soonest_next_one() -> None:
    polls = Polls(
        {
            "shop-a": state("shop-a", finished=T0),
            "shop-b": state("shop-b", finished=T0 - timedelta(minutes=1), error="IMAP down"),
        }
    )
    fleet = Fleet(
        {
            "shop-a": RouteOutcome(route="shop-a", next_fire_at=T0 + timedelta(minutes=4)),
            "shop-b": RouteOutcome(route="shop-b", next_fire_at=T0 + timedelta(minutes=2)),
            "shop-c": RouteOutcome(route="shop-c"),  # not started yet: no next fire
        }
    )
    status = poll_status(polls, fleet)
    assert status.last_finished_at == T0
    assert status.last_success_at == T0
    assert (status.last_error, status.last_error_at) == ("IMAP down", T0 - timedelta(minutes=1))
    assert status.next_poll_at == T0 + timedelta(minutes=2)


def test_before_any_poll_nothing_is_claimed() -> None:
    status = poll_status(Polls({}), Fleet({}))
    assert status.last_finished_at is None and status.next_poll_at is None
    assert status.last_error is None
