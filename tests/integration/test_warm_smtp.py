"""WarmSmtpOutbox against Postfix (which logs each session's commands at its end) and
the aiosmtpd sink: a kept session is reused after a NOOP, a dropped one opened anew,
an envelope written ahead reset when the session is kept, and a session unused for
`keep_seconds` QUIT."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.integration.test_outbox import FORWARD_FROM, FORWARD_TO, document
from tests.servers.postfix import POSTFIX, Postfix, running_postfix
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.stall_proxy import Fault, running_proxy
from worker.delivery.warm import KEEP_SECONDS, WarmSmtpOutbox
from worker.models import Security

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which(POSTFIX) is None, reason="scripts/lib/setup.sh installs postfix"
    ),
]


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with running_sink() as sink:
        yield sink


@pytest.fixture
def postfix(sink: SmtpSink) -> Iterator[Postfix]:
    with running_postfix(relay_port=sink.port) as server:
        yield server


def warm_outbox(port: int, *, keep_seconds: float = KEEP_SECONDS) -> WarmSmtpOutbox:
    return WarmSmtpOutbox(
        host="127.0.0.1",
        port=port,
        security=Security.NONE,
        credentials=None,
        forward_from=FORWARD_FROM,
        forward_to=FORWARD_TO,
        timeout=10,
        keep_seconds=keep_seconds,
    )


def sessions_with_mail(postfix: Postfix) -> list[dict[str, int]]:
    return [counts for counts in postfix.session_counts() if "mail" in counts]


def test_a_kept_session_carries_the_next_mail_after_a_noop(
    postfix: Postfix, sink: SmtpSink
) -> None:
    outbox = warm_outbox(postfix.port)
    try:
        for number in (1, 2):
            outbox.open()
            outbox.deliver(document(number))
            outbox.close()  # kept, not QUIT
        assert outbox.reused == 1
    finally:
        outbox.shut()
    postfix.wait_for_log(r" disconnect from .* mail=")
    (session,) = sessions_with_mail(postfix)
    assert session["mail"] == session["bdat"] == 2
    assert session["noop"] == 1
    assert session["quit"] == 1
    postfix.wait_until_relayed()
    assert len(sink.messages) == 2


def test_a_check_made_ahead_stands_for_the_noop_of_the_next_open(postfix: Postfix) -> None:
    outbox = warm_outbox(postfix.port)
    try:
        outbox.open()
        outbox.deliver(document(1))
        outbox.close()
        outbox.prepare()  # while the poll reads the mail, the session is checked
        outbox.open()  # waits for that check; sends no second NOOP
        outbox.deliver(document(2))
        outbox.close()
    finally:
        outbox.shut()
    postfix.wait_for_log(r" disconnect from .* mail=")
    (session,) = sessions_with_mail(postfix)
    assert session["noop"] == 1
    assert session["mail"] == 2
    assert outbox.reused == 1


def test_an_envelope_written_ahead_is_reset_when_the_session_is_kept(
    postfix: Postfix, sink: SmtpSink
) -> None:
    outbox = warm_outbox(postfix.port)
    try:
        outbox.open()
        # The forwarder said another mail follows, then stopped before sending it.
        outbox.deliver(document(1), more_follows=True)
        outbox.close()
        outbox.open()
        outbox.deliver(document(2))
        outbox.close()
    finally:
        outbox.shut()
    postfix.wait_for_log(r" disconnect from .* mail=")
    (session,) = sessions_with_mail(postfix)
    assert session["mail"] == 3  # the envelope written ahead, then the next mail's own
    assert session["rset"] == 1
    assert session["bdat"] == 2
    postfix.wait_until_relayed()
    assert sorted(str(mail.message["Subject"]) for mail in sink.messages) == [
        "Invoice 1",
        "Invoice 2",
    ]


def test_a_kept_session_the_server_dropped_is_opened_anew(sink: SmtpSink) -> None:
    with running_proxy(sink.port) as proxy:
        # The line is cut as the NOOP goes out: to the relay, a session the server
        # dropped while it was kept.
        proxy.add_fault(Fault(direction="to_server", action="drop", after_pattern=b"NOOP"))
        outbox = warm_outbox(proxy.port)
        try:
            outbox.open()
            outbox.deliver(document(1))
            outbox.close()
            outbox.open()
            outbox.deliver(document(2))
            outbox.close()
        finally:
            outbox.shut()
        assert proxy.tripped.is_set()
        assert proxy.connections == 2
    assert (outbox.reused, outbox.reopened) == (0, 1)
    assert [str(mail.message["Subject"]) for mail in sink.messages] == ["Invoice 1", "Invoice 2"]


def test_a_session_kept_unused_for_keep_seconds_is_quit(postfix: Postfix) -> None:
    # keep_seconds shortened from its 60 s: waiting a minute in a test is all the default
    # would add; the property (QUIT once unused that long, never while in use, and a
    # new session after) does not depend on the length.
    outbox = warm_outbox(postfix.port, keep_seconds=0.5)
    try:
        outbox.open()
        outbox.deliver(document(1))
        outbox.close()
        postfix.wait_for_log(r" disconnect from .* mail=")
        assert not outbox.is_open
        (session,) = sessions_with_mail(postfix)
        assert session["quit"] == 1
        assert "noop" not in session
        outbox.open()  # a new session, not a dropped one found
        outbox.deliver(document(2))
        outbox.close()
    finally:
        outbox.shut()
    assert (outbox.reused, outbox.reopened) == (0, 0)
    postfix.wait_for_log(r" disconnect from .* mail=", 2)
    assert [counts["mail"] for counts in sessions_with_mail(postfix)] == [1, 1]
