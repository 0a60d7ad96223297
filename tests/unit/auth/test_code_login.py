"""`oauth login` for Google and generic providers (worker.auth.login.CodeLogin): the URL
a person opens, and the redirect's checks before any token request."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from worker.auth.login import GOOGLE_PARAMETERS, CodeLogin
from worker.errors import OAuthLoginRefused


class Budget:
    def remaining(self) -> float:
        return 10.0


def refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no token request expected: {request.url}")


def sign_in(authorize_url: str = "https://id.example/authorize") -> CodeLogin:
    return CodeLogin(
        httpx.Client(transport=httpx.MockTransport(refuse)),
        authorize_url=authorize_url,
        token_url="https://id.example/token",
        client_id="desktop-1",
        client_secret=None,
        scopes=("https://mail.google.com/",),
        route="the default route",
        clock=lambda: datetime(2026, 3, 1, tzinfo=UTC),
        parameters=GOOGLE_PARAMETERS,
    )


def test_the_url_carries_pkce_s256_state_and_the_providers_parameters() -> None:
    login = sign_in()
    url = login.start(redirect_uri="http://localhost:4711", deadline=Budget())
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://id.example/authorize"
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == "http://localhost:4711"
    assert query["scope"] == "https://mail.google.com/"
    assert query["access_type"] == "offline" and query["prompt"] == "consent"
    assert query["code_challenge_method"] == "S256"
    verifier = login._verifier
    assert 43 <= len(verifier) <= 128  # RFC 7636 §4.1
    digest = hashlib.sha256(verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert verifier not in url
    assert len(query["state"]) >= 32


def test_an_authorize_url_with_a_query_keeps_it() -> None:
    url = sign_in("https://id.example/authorize?tenant=a").start(
        redirect_uri="http://localhost:1", deadline=Budget()
    )
    assert url.startswith("https://id.example/authorize?tenant=a&")


def test_two_sign_ins_have_their_own_state_and_verifier() -> None:
    first, second = sign_in(), sign_in()
    assert first._state != second._state and first._verifier != second._verifier


@pytest.mark.parametrize(
    ("response", "said"),
    [
        ({"error": "access_denied", "state": "x"}, "ended with access_denied"),
        ({"code": "c", "state": "forged"}, "state differs"),
        ({"code": "c"}, "state differs"),
    ],
)
def test_a_refused_or_foreign_redirect_asks_for_no_token(
    response: dict[str, str], said: str
) -> None:
    login = sign_in()
    login.start(redirect_uri="http://localhost:4711", deadline=Budget())
    with pytest.raises(OAuthLoginRefused) as caught:
        login.finish(response, Budget())
    assert said in str(caught.value)
