"""SmtpOutbox and the relay against Postfix (PIPELINING and CHUNKING on), which relays
to the aiosmtpd sink (neither): the same content arrives as when the relay sends to the
sink directly, in one exchange per mail, and Postfix's answers are classified as the
README's "SMTP answers" says."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage

import pytest

from tests.integration.test_outbox import FORWARD_FROM, FORWARD_TO, document
from tests.servers.postfix import POSTFIX, Postfix, running_postfix
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.stall_proxy import running_proxy
from worker.delivery.smtp import SmtpOutbox
from worker.errors import DeliveryDeferred, DeliveryRefused, DeliveryRejected, SessionRefused
from worker.models import Security

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which(POSTFIX) is None, reason="scripts/lib/setup.sh installs postfix"
    ),
]

# Trace headers a relaying server adds; everything else must arrive as sent.
TRACE = {"received", "return-path", "x-original-to", "delivered-to"}


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with running_sink() as sink:
        yield sink


@pytest.fixture
def postfix(sink: SmtpSink) -> Iterator[Postfix]:
    with running_postfix(relay_port=sink.port) as server:
        yield server


def outbox_to(port: int, *, forward_to: str = FORWARD_TO) -> SmtpOutbox:
    return SmtpOutbox(
        host="127.0.0.1",
        port=port,
        security=Security.NONE,
        credentials=None,
        forward_from=FORWARD_FROM,
        forward_to=forward_to,
        timeout=10,
    )


def without_trace(message: EmailMessage) -> list[tuple[str, str]]:
    return [(name, str(value)) for name, value in message.items() if name.lower() not in TRACE]


def test_a_batch_goes_in_one_exchange_per_mail_and_arrives_unchanged(
    postfix: Postfix, sink: SmtpSink
) -> None:
    batch = [document(number) for number in range(1, 6)]
    with running_proxy(postfix.port) as proxy, outbox_to(proxy.port) as outbox:
        for index, parcel in enumerate(batch):
            outbox.deliver(parcel, more_follows=index + 1 < len(batch))
        assert outbox.round_trips == len(batch)
    postfix.wait_for_log(r": removed$", len(batch))
    # The client spoke after the server at most once per mail, besides the greeting,
    # EHLO and QUIT: the envelope was pipelined with the content.
    assert proxy.turns <= len(batch) + 2
    (session,) = [counts for counts in postfix.session_counts() if "mail" in counts]
    assert session["mail"] == session["rcpt"] == session["bdat"] == len(batch)
    assert "data" not in session  # BDAT ... LAST carried every mail, never DATA
    relayed = sorted(sink.messages, key=lambda mail: str(mail.message["X-Invoice-Relay"]))
    assert len(relayed) == len(batch)

    # The same mails sent to the sink directly (no PIPELINING, no CHUNKING: the old way).
    direct_sink_start = len(sink.messages)
    with outbox_to(sink.port) as outbox:
        for parcel in batch:
            outbox.deliver(parcel)
    direct = sorted(
        sink.messages[direct_sink_start:], key=lambda mail: str(mail.message["X-Invoice-Relay"])
    )
    for through_postfix, straight in zip(relayed, direct, strict=True):
        assert _comparable(through_postfix.message) == _comparable(straight.message)


def _comparable(message: EmailMessage) -> tuple[list[tuple[str, str]], bytes]:
    # Date and the MIME boundary differ between two builds of one mail.
    headers = [
        (name, value)
        for name, value in without_trace(message)
        if name not in ("Date", "Content-Type")
    ]
    headers.append(("Content-Type", message.get_content_type()))
    attachment = next(iter(message.iter_attachments()))
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return headers, payload


@pytest.mark.parametrize(
    ("access", "kind"),
    [("550 5.1.1 no such mailbox", SessionRefused), ("450 4.2.0 try later", SessionRefused)],
)
def test_a_refused_recipient_refuses_the_session(access: str, kind: type[Exception]) -> None:
    settings = {
        "smtpd_recipient_restrictions": (
            f"check_recipient_access inline:{{ {{ {FORWARD_TO} = {access} }} }}"
        )
    }
    with (
        running_postfix(settings=settings) as postfix,
        outbox_to(postfix.port) as outbox,
        pytest.raises(kind, match=access.split(maxsplit=1)[0]),
    ):
        outbox.deliver(document(1))


@pytest.mark.parametrize(
    ("action", "kind", "code"),
    [
        ("REJECT 5.7.1 not an invoice", DeliveryRejected, 5),
        ("REJECT 4.7.1 come back later", DeliveryDeferred, 4),
    ],
)
def test_answers_to_the_content_are_classified(
    action: str, kind: type[Exception], code: int
) -> None:
    settings = {"header_checks": f"regexp:{{ {{ /^Subject: refuse me/ {action} }} }}"}
    refused = replace(document(1), original_subject="refuse me")
    with running_postfix(settings=settings) as postfix:
        with outbox_to(postfix.port) as outbox:
            with pytest.raises(DeliveryRefused) as caught:
                outbox.deliver(refused, more_follows=True)
            assert type(caught.value) is kind
            assert caught.value.code is not None and caught.value.code // 100 == code
            outbox.deliver(document(2))  # the session carries on after RSET
        postfix.wait_for_log(r"disconnect from .* mail=")
        (session,) = [counts for counts in postfix.session_counts() if "mail" in counts]
    # The envelope written ahead of the refused mail was dropped by RSET; the second
    # mail went out under one of its own.
    assert (session["mail"], session["rset"], session["bdat"]) == (3, 1, 2)


def test_a_refused_additional_session_is_told_apart() -> None:
    with running_postfix(max_sessions=1) as postfix, outbox_to(postfix.port) as first:
        second = outbox_to(postfix.port)
        with pytest.raises(SessionRefused, match="421"):
            second.open()
        first.deliver(document(1))
