"""When a session logged in with an OAuth2 token is logged in again (worker.tokens)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.tokens import renew_session_at

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lifetime", "renewed_after"),
    [
        (timedelta(hours=1), timedelta(minutes=59)),  # Microsoft's and Google's: a minute early
        (timedelta(minutes=5), timedelta(minutes=4)),  # Keycloak's default
        (timedelta(minutes=2), timedelta(seconds=90)),  # a quarter of the life is less
        (timedelta(seconds=12), timedelta(seconds=9)),
        (timedelta(0), timedelta(0)),  # expired at login: at once
        (timedelta(seconds=-5), timedelta(seconds=-5)),  # a clock behind: at once, not later
    ],
)
def test_renewed_a_minute_or_a_quarter_of_its_life_before_the_token_expires(
    lifetime: timedelta, renewed_after: timedelta
) -> None:
    assert renew_session_at(T0 + lifetime, logged_in_at=T0) == T0 + renewed_after


def test_the_renewal_falls_inside_the_token_sources_refresh_margin() -> None:
    """worker.auth.cache hands out a new token when less than min(5 min, half its life)
    is left: at the renewal there always is, so the new session gets a new token."""
    for seconds in (10, 60, 600, 3600, 5400):
        lifetime = timedelta(seconds=seconds)
        left = T0 + lifetime - renew_session_at(T0 + lifetime, logged_in_at=T0)
        assert left < min(timedelta(minutes=5), lifetime / 2)
