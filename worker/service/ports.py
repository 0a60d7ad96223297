"""What the many-route service needs of the database, split by who needs it;
`worker.store.sqlstore.SqlStore` answers both. Each raises `worker.errors.StoreError`
when the database cannot be used."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from worker.models import RoutePollState


class FireClaims(Protocol):
    """The scheduler's side: who polls a fire time, and what came of it."""

    def claim_fire(self, route: str, fire_time: datetime, owner: str) -> bool:
        """True for the one replica that claims (route, fire_time) first; False for
        every later claim, by anyone."""

    def forget_claims_older_than(self, seconds: float) -> int:
        """Delete the claims made more than `seconds` ago (the database's clock); how
        many went."""

    def record_route_poll(
        self,
        route: str,
        *,
        started_at: datetime,
        finished_at: datetime,
        ok: bool,
        summary: str,
        error: str | None,
        owner: str,
    ) -> None:
        """Keep the route's latest poll (and, when `ok`, its latest success)."""


class RoutePolls(Protocol):
    """The health side: every route's latest poll, by any replica."""

    def route_polls(self) -> dict[str, RoutePollState]: ...
