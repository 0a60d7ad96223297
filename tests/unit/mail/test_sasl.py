"""The SASL messages that carry a token: XOAUTH2 and OAUTHBEARER (RFC 7628), by table."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from worker.mail.sasl import (
    Exchange,
    SaslError,
    login_with_token,
    oauthbearer,
    preferred_mechanism,
    sasl_error,
    xoauth2,
)
from worker.tokens import AccessToken, TokenCredentials


@pytest.mark.parametrize(
    ("user", "token", "expected"),
    [
        # Google's documented example (developers.google.com/gmail/imap/xoauth2-protocol).
        (
            "someuser@example.com",
            "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
            b"user=someuser@example.com\x01auth=Bearer "
            b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01",
        ),
        (
            "invoices@shop.example",
            "at-abc_DEF-123",
            b"user=invoices@shop.example\x01auth=Bearer at-abc_DEF-123\x01\x01",
        ),
    ],
)
def test_xoauth2_initial_response(user: str, token: str, expected: bytes) -> None:
    assert xoauth2(user=user, token=token) == expected


def test_google_documented_base64_matches() -> None:
    # The base64 form Google's page shows for the same example.
    encoded = base64.b64encode(
        xoauth2(user="someuser@example.com", token="ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    )
    assert encoded == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
        b"YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


@pytest.mark.parametrize(
    ("user", "host", "port", "expected"),
    [
        # RFC 7628 §4.1's example: user@example.com at server.example.com:143.
        (
            "user@example.com",
            "server.example.com",
            143,
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01",
        ),
        (
            "user@example.com",
            None,
            None,
            b"n,a=user@example.com,\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01",
        ),
        # RFC 5801 saslname escaping of "," and "=".
        (
            "a,b=c@example.com",
            None,
            993,
            b"n,a=a=2Cb=3Dc@example.com,\x01port=993\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01",
        ),
    ],
)
def test_oauthbearer_initial_response(
    user: str, host: str | None, port: int | None, expected: bytes
) -> None:
    token = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert oauthbearer(user=user, token=token, host=host, port=port) == expected


@pytest.mark.parametrize(
    ("user", "token"),
    [
        ("", "at-1"),
        ("a\x01b@example.com", "at-1"),
        ("with space@example.com", "at-1"),
        ("user@example.com", ""),
        ("user@example.com", "at 1"),
        ("user@example.com", "at\x011"),
        ("user@example.com", "at\r\n1"),
    ],
)
def test_values_that_would_break_the_message_are_refused(user: str, token: str) -> None:
    with pytest.raises(ValueError) as caught:
        xoauth2(user=user, token=token)
    assert token not in str(caught.value) or not token
    with pytest.raises(ValueError):
        oauthbearer(user=user, token=token)


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        # RFC 7628 §3.2.2's example, as the server sends it (base64) and decoded.
        (
            base64.b64encode(
                b'{"status":"invalid_token","scope":"example_scope",'
                b'"openid-configuration":"https://example.com/.well-known/openid-configuration"}'
            ),
            SaslError(status="invalid_token", scope="example_scope"),
        ),
        (
            b'{"status":"401","schemes":"bearer mac","scope":"https://mail.google.com/"}',
            SaslError(status="401", scope="https://mail.google.com/"),
        ),
        (b'{"status":"insufficient_scope"}', SaslError(status="insufficient_scope")),
        (b"", None),
        (b"not json", None),
        (base64.b64encode(b"[1, 2]"), None),
    ],
)
def test_error_challenges(challenge: bytes, expected: SaslError | None) -> None:
    assert sasl_error(challenge) == expected


@pytest.mark.parametrize(
    ("status", "refused"), [("invalid_token", True), ("401", True), ("insufficient_scope", False)]
)
def test_which_errors_a_fresh_token_may_fix(status: str, refused: bool) -> None:
    assert SaslError(status=status).token_refused is refused


class _Tokens:
    """A token source handing out at-1, at-2, ...; records what was refused."""

    def __init__(self) -> None:
        self.handed: list[str] = []
        self.refused: list[str | None] = []

    def access_token(self, *, refused: AccessToken | None = None) -> AccessToken:
        self.refused.append(refused.value if refused else None)
        if refused is None and self.handed:
            value = self.handed[-1]
        else:
            value = f"at-{len(self.handed) + 1}"
            self.handed.append(value)
        return AccessToken(value=value, expires_at=datetime(2030, 1, 1, tzinfo=UTC))


EXPIRED = SaslError(status="invalid_token")
SCOPE = SaslError(status="insufficient_scope")


@pytest.mark.parametrize(
    ("answers", "tried", "result"),
    [
        ([None], ["at-1"], None),
        ([EXPIRED, None], ["at-1", "at-2"], None),
        ([EXPIRED, EXPIRED], ["at-1", "at-2"], EXPIRED),  # once more only, never a loop
        ([SCOPE], ["at-1"], SCOPE),  # a fresh token cannot fix a missing permission
        ([SaslError(status="401"), None], ["at-1", "at-2"], None),
    ],
)
def test_a_refused_token_gets_one_retry_with_a_fresh_one(
    answers: list[SaslError | None], tried: list[str], result: SaslError | None
) -> None:
    tokens = _Tokens()
    pending = list(answers)
    sent: list[str] = []

    def attempt(token: AccessToken) -> SaslError | None:
        sent.append(token.value)
        return pending.pop(0)

    assert login_with_token(tokens, attempt) == result
    assert sent == tried
    assert tokens.refused[1:] == ["at-1"][: len(tried) - 1]


def test_token_credentials_print_without_a_token() -> None:
    credentials = TokenCredentials(user="invoices@shop.example", tokens=_Tokens())
    assert repr(credentials) == "TokenCredentials(user='invoices@shop.example')"


@pytest.mark.parametrize(
    ("mechanism", "challenges", "responses", "error"),
    [
        ("XOAUTH2", [b""], [b"user=u@example.com\x01auth=Bearer at-1\x01\x01"], None),
        ("XOAUTH2", [None], [b"user=u@example.com\x01auth=Bearer at-1\x01\x01"], None),
        (
            "XOAUTH2",
            [b"", base64.b64encode(b'{"status":"401","schemes":"bearer"}')],
            [b"user=u@example.com\x01auth=Bearer at-1\x01\x01", b""],
            SaslError(status="401"),
        ),
        (
            "OAUTHBEARER",
            [None, b'{"status":"invalid_token"}', b"again"],
            [b"n,a=u@example.com,\x01auth=Bearer at-1\x01\x01", b"\x01", b"\x01"],
            SaslError(status="invalid_token"),
        ),
        (
            "XOAUTH2",
            [None, b"\x00garbage"],
            [b"user=u@example.com\x01auth=Bearer at-1\x01\x01", b""],
            SaslError(status="unreadable"),
        ),
    ],
)
def test_an_exchange_answers_an_error_challenge_with_an_abort(
    mechanism: str,
    challenges: list[bytes | None],
    responses: list[bytes],
    error: SaslError | None,
) -> None:
    exchange = Exchange(mechanism=mechanism, user="u@example.com", token="at-1")
    assert [exchange(challenge) for challenge in challenges] == responses
    assert exchange.error == error
    assert "at-1" not in repr(exchange)


def test_an_exchange_gives_smtplib_text() -> None:
    exchange = Exchange(mechanism="XOAUTH2", user="u@example.com", token="at-1")
    assert exchange.text() == "user=u@example.com\x01auth=Bearer at-1\x01\x01"
    with pytest.raises(ValueError):
        Exchange(mechanism="PLAIN", user="u@example.com", token="at-1")


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (frozenset({"XOAUTH2", "OAUTHBEARER", "PLAIN"}), "XOAUTH2"),
        (frozenset({"OAUTHBEARER"}), "OAUTHBEARER"),
        (frozenset({"PLAIN", "LOGIN"}), None),
    ],
)
def test_the_mechanism_chosen(offered: frozenset[str], chosen: str | None) -> None:
    assert preferred_mechanism(offered) == chosen
