"""Tables for worker.mail.headers: the header block to MailHeaders, cleaned and capped."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.mail.headers import (
    AUTH_RESULTS_MAX_CHARS,
    AUTH_RESULTS_MAX_COUNT,
    SUBJECT_MAX_CHARS,
    decode_encoded_words,
    parse_headers,
)
from worker.models import MailHeaders

BERLIN_WINTER = timezone(timedelta(hours=1))

HEADER_CASES: list[tuple[str, bytes, dict[str, object]]] = [
    (
        "plain",
        b"From: Shop <Invoices@Shop.Example>\r\nSubject: Invoice 1042\r\n"
        b"Date: Mon, 24 Nov 2025 10:00:00 +0100\r\nMessage-ID:  <abc@shop.example> \r\n\r\n",
        {
            "sender": "Shop <Invoices@Shop.Example>",
            "sender_address": "invoices@shop.example",
            "sender_defect": None,
            "subject": "Invoice 1042",
            "date": datetime(2025, 11, 24, 10, 0, tzinfo=BERLIN_WINTER),
            "message_id": "<abc@shop.example>",
        },
    ),
    (
        "encoded subject and name",
        b"From: =?utf-8?Q?J=C3=B6rg_M=C3=BCller?= <jm@x.example>\r\n"
        b"Subject: =?utf-8?B?UmVjaG51bmcg4oCTIE5yLiAxMDQy?=\r\n",
        {
            "sender": "Jörg Müller <jm@x.example>",
            "sender_address": "jm@x.example",
            "subject": "Rechnung \u2013 Nr. 1042",
        },
    ),
    (
        "folded subject",
        b"Subject: Invoice\r\n 1042\r\nFrom: a@x.example\r\n",
        {"subject": "Invoice 1042", "sender_address": "a@x.example"},
    ),
    (
        "several addresses",
        b"From: a@x.example, b@y.example\r\n",
        {
            "sender_address": "",
            "sender_defect": "several From addresses",
            "sender": "a@x.example, b@y.example",
        },
    ),
    (
        "several From headers",
        b"From: a@x.example\r\nFrom: b@y.example\r\n",
        {"sender_address": "", "sender_defect": "several From headers"},
    ),
    (
        "group without address",
        b"From: undisclosed-recipients:;\r\n",
        {"sender_address": "", "sender_defect": "From has no address"},
    ),
    (
        "no domain",
        b"From: Joe <joe>\r\n",
        {"sender_address": "", "sender": "Joe <joe>"},
    ),
    (
        "double at",
        b"From: Joe <joe@@x.example>\r\n",
        {"sender_address": "", "sender": "Joe <joe@@x.example>"},
    ),
    (
        "unclosed angle",
        b"From: <a@x.example\r\n",
        {"sender_address": ""},
    ),
    ("no From", b"Subject: hi\r\n", {"sender": "", "sender_defect": "no From header"}),
    (
        "CR LF NUL injection",
        b"From: a@x.example\r\nSubject: Invoice\x00 10\x1b[2J42\rBcc: evil@x.example\r\n",
        {"subject": "Invoice 10[2J42", "sender_address": "a@x.example"},
    ),
    (
        "8-bit utf-8",
        "Subject: Grüße\r\nFrom: Jörg <j@x.example>\r\n".encode(),
        {"subject": "Grüße", "sender": "Jörg <j@x.example>", "sender_address": "j@x.example"},
    ),
    (
        "8-bit garbage",
        b"Subject: Caf\xe9 \xff\r\nFrom: \xff@\xfe\r\nDate: \xff\xfe\r\n",
        {"subject": "Café ÿ", "sender_address": "", "date": None},
    ),
    ("unknown charset", b"Subject: =?x-nope?Q?abc?=\r\n", {"subject": "abc"}),
    (
        "date without zone",
        b"Date: Mon, 24 Nov 2025 10:00:00 -0000\r\n",
        {"date": datetime(2025, 11, 24, 10, 0, tzinfo=UTC)},
    ),
    ("date garbage", b"Date: yesterday-ish\r\n", {"date": None}),
    (
        "loop markers",
        b"Auto-Submitted: auto-generated\r\nX-Invoice-Relay: v1; sha256=ab\r\n",
        {"auto_submitted": "auto-generated", "relay_marker": "v1; sha256=ab"},
    ),
    (
        "markers absent",
        b"From: a@x.example\r\n",
        {"auto_submitted": None, "relay_marker": None, "message_id": ""},
    ),
    ("long subject", b"Subject: " + b"x" * 5000 + b"\r\n", {"subject": "x" * SUBJECT_MAX_CHARS}),
    ("empty", b"", {"sender_defect": "no From header", "subject": ""}),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [case[1:] for case in HEADER_CASES],
    ids=[case[0] for case in HEADER_CASES],
)
def test_parse_headers(raw: bytes, expected: dict[str, object]) -> None:
    headers = parse_headers(raw)
    assert {name: getattr(headers, name) for name in expected} == expected
    assert (headers.sender_address == "") == (headers.sender_defect is not None)
    assert_clean(headers)


def assert_clean(headers: MailHeaders) -> None:
    fields = ("message_id", "sender", "sender_address", "subject", "sender_defect")
    for name in (*fields, "auto_submitted", "relay_marker"):
        value: str | None = getattr(headers, name)
        assert not any(unicodedata.category(char) == "Cc" for char in value or ""), name
    assert len(headers.subject) <= SUBJECT_MAX_CHARS
    assert headers.date is None or headers.date.tzinfo is not None


HEADER_NAMES = st.sampled_from(
    [b"From", b"Subject", b"Date", b"Message-ID", b"Auto-Submitted", b"X-Invoice-Relay", b"To"]
)
HEADER_LINES = st.lists(
    st.tuples(HEADER_NAMES, st.binary(max_size=60)).map(lambda item: item[0] + b": " + item[1]),
    max_size=8,
).map(b"\r\n".join)


@given(st.one_of(st.binary(max_size=400), HEADER_LINES))
def test_parse_headers_never_raises(raw: bytes) -> None:
    assert_clean(parse_headers(raw))


# --- injection through encoded words, and the Authentication-Results list --------------

INJECTION_CASES: list[tuple[str, bytes, dict[str, object]]] = [
    (
        "q-encoded CR LF in subject",
        b"From: a@x.example\r\nSubject: =?utf-8?q?Invoice=0D=0ABcc:_evil@x.example?=\r\n",
        {"subject": "Invoice Bcc: evil@x.example", "sender_address": "a@x.example"},
    ),
    (
        "b-encoded LF NUL in subject",
        b"From: a@x.example\r\nSubject: =?utf-8?b?SW52b2ljZQpYLUV2aWw6IDEAMg==?=\r\n",
        {"subject": "Invoice X-Evil: 12"},
    ),
    (
        # The parser flags it as a defect: such a From is never trusted.
        "encoded CR LF in display name",
        b"From: =?utf-8?q?Shop=0D=0ABcc:_evil@x.example?= <a@x.example>\r\n",
        {
            "sender": "Shop Bcc: evil@x.example <a@x.example>",
            "sender_address": "",
            "sender_defect": "unparseable From: ValueError",
        },
    ),
    (
        # A bare CR ends the line for the parser: what follows is another header.
        "bare CR in subject",
        b"From: a@x.example\r\nSubject: Invoice\rTo: evil@x.example\r\n",
        {"subject": "Invoice"},
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [case[1:] for case in INJECTION_CASES],
    ids=[case[0] for case in INJECTION_CASES],
)
def test_encoded_line_breaks_are_removed_like_raw_ones(
    raw: bytes, expected: dict[str, object]
) -> None:
    headers = parse_headers(raw)
    assert {name: getattr(headers, name) for name in expected} == expected
    assert_clean(headers)


def test_authentication_results_are_kept_in_order_unfolded() -> None:
    raw = (
        b"Authentication-Results: mx.shop.example;\r\n\tdkim=pass header.d=x.example\r\n"
        b"From: a@x.example\r\n"
        b"authentication-results: other.example; none\r\n"
    )
    assert parse_headers(raw).authentication_results == (
        "mx.shop.example; dkim=pass header.d=x.example",
        "other.example; none",
    )


def test_authentication_results_are_bounded() -> None:
    one = b"Authentication-Results: mx.example; dkim=pass " + b"x" * 9000 + b"\r\n"
    values = parse_headers(one * 50).authentication_results
    assert len(values) == AUTH_RESULTS_MAX_COUNT
    assert all(len(value) == AUTH_RESULTS_MAX_CHARS for value in values)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("=?utf-8?q?a=0D=0Ab?=", "a\r\nb"),
        ("=?x-unknown?q?abc?=", "abc"),
    ],
)
def test_decode_encoded_words(value: str, expected: str) -> None:
    assert decode_encoded_words(value) == expected
