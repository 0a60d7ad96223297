"""Token endpoint answers (RFC 6749 §5.1, §5.2) and what each means, by table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.auth.grants import DEFAULT_LIFETIME, error_for, parse_success
from worker.errors import OAuthClientRejected, OAuthLoginRefused, TokenEndpointError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "lifetime", "refresh"),
    [
        ({"access_token": "at-1", "token_type": "Bearer", "expires_in": 3599}, 3599, None),
        ({"access_token": "at-1", "token_type": "bearer", "expires_in": "3600"}, 3600, None),
        ({"access_token": "at-1", "expires_in": 60, "refresh_token": "rt-2"}, 60, "rt-2"),
        ({"access_token": "at-1", "token_type": "Bearer"}, None, None),
        ({"access_token": "at-1", "expires_in": -5, "refresh_token": ""}, None, None),
        ({"access_token": "at-1", "expires_in": True}, None, None),
    ],
)
def test_success_answers(
    body: dict[str, object], lifetime: int | None, refresh: str | None
) -> None:
    grant = parse_success(body, now=NOW, endpoint="login.example")
    assert grant.access.value == "at-1"
    expected = timedelta(seconds=lifetime) if lifetime is not None else DEFAULT_LIFETIME
    assert grant.access.expires_at == NOW + expected
    assert grant.refresh_token == refresh


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"access_token": ""},
        {"access_token": 5},
        {"access_token": "at-1", "token_type": "mac"},
    ],
)
def test_answers_without_a_usable_token_are_an_outage(body: dict[str, object]) -> None:
    with pytest.raises(TokenEndpointError) as caught:
        parse_success(body, now=NOW, endpoint="login.example")
    assert type(caught.value) is TokenEndpointError


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        (
            {"error": "invalid_grant", "error_description": "AADSTS70008: expired"},
            400,
            OAuthLoginRefused,
            "invoice-relay oauth login",
        ),
        ({"error": "invalid_client"}, 401, OAuthClientRejected, "client id app-1"),
        (None, 401, OAuthClientRejected, "app-1"),
        (
            {"error": "invalid_scope", "error_description": "bad"},
            400,
            TokenEndpointError,
            "invalid_scope",
        ),
        ({"error": "temporarily_unavailable"}, 503, TokenEndpointError, "temporarily_unavailable"),
        (None, 500, TokenEndpointError, "HTTP 500"),
        (None, 502, TokenEndpointError, "HTTP 502"),
    ],
)
def test_error_answers(
    body: dict[str, object] | None, status: int, kind: type[TokenEndpointError], says: str
) -> None:
    error = error_for(body, status=status, endpoint="login.example", client_id="app-1")
    assert type(error) is kind
    assert says in str(error)
    assert "login.example" in str(error)


def test_a_refused_grant_names_the_route_and_the_fix() -> None:
    error = error_for({"error": "invalid_grant"}, status=400, endpoint="e", route="route shop-a")
    assert isinstance(error, OAuthLoginRefused)
    assert error.route == "route shop-a"
    assert "route shop-a: run `invoice-relay oauth login`" in str(error)
    assert "INVOICE_RELAY_OAUTH_REFRESH_TOKEN" in str(error)
    default = error_for({"error": "invalid_grant"}, status=400, endpoint="e")
    assert "the default route" in str(default)


def test_a_strangers_description_is_capped_to_one_printable_line() -> None:
    body = {
        "error": "invalid_grant",
        "error_description": "line one\x1b[31m" + "x" * 500 + "\nline two",
    }
    text = str(error_for(body, status=400, endpoint="e"))
    assert "line two" not in text
    assert "\x1b" not in text
    assert len(text) < 500


def test_grants_print_without_their_tokens() -> None:
    grant = parse_success(
        {"access_token": "at-secret-1", "refresh_token": "rt-secret-2", "expires_in": 60},
        now=NOW,
        endpoint="e",
    )
    for text in (repr(grant), str(grant), repr(grant.access), str(grant.access)):
        assert "secret" not in text
