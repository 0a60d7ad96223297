"""SmtpOutbox over PIPELINING (RFC 2920) and CHUNKING (RFC 3030), against a scripted
server that can hold its answers back: a client that waited for an answer before its
next command would never get one, so these tests prove what went out in one write."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.message import EmailMessage

import pytest

from tests.integration.test_outbox import FORWARD_FROM, FORWARD_TO, document, mail
from tests.servers.esmtp_script import ScriptedEsmtp
from worker.delivery.message import build_forward
from worker.delivery.smtp import SmtpOutbox
from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryRejected,
    SessionRefused,
)
from worker.models import Parcel, Security

pytestmark = pytest.mark.integration

TIMEOUT = 5.0  # a client that waits for a held answer fails after this long


@pytest.fixture
def server() -> Iterator[ScriptedEsmtp]:
    server = ScriptedEsmtp()
    server.start()
    yield server
    server.stop()


def outbox_for(server: ScriptedEsmtp) -> SmtpOutbox:
    return SmtpOutbox(
        host="127.0.0.1",
        port=server.port,
        security=Security.NONE,
        credentials=None,
        forward_from=FORWARD_FROM,
        forward_to=FORWARD_TO,
        timeout=TIMEOUT,
    )


def last_chunks(commands: list[str]) -> int:
    return sum(1 for line in commands if line.upper().startswith("BDAT") and line.endswith("LAST"))


def count(verb: str) -> Callable[[list[str]], int]:
    return lambda commands: sum(1 for line in commands if line.upper().startswith(verb))


def test_envelope_and_content_go_out_in_one_write(server: ScriptedEsmtp) -> None:
    server.hold_until = lambda commands: last_chunks(commands) == 1
    with outbox_for(server) as outbox:
        receipt = outbox.deliver(document(1))
        assert outbox.round_trips == 1
    assert receipt.answer.startswith("250")
    assert received(server) == [sent(1)]
    verbs = server.verbs()
    assert verbs[verbs.index("MAIL") :] == ["MAIL", "RCPT", "BDAT", "QUIT"]
    assert server.received[verbs.index("BDAT")] == f"BDAT {len(mail(1).as_bytes())} LAST"


def test_the_next_envelope_goes_out_before_the_answer_is_awaited(server: ScriptedEsmtp) -> None:
    # The first mail's answer is held until the second mail's envelope has arrived.
    rcpts = count("RCPT")
    server.hold_until = lambda commands: (
        last_chunks(commands) == 2 or (last_chunks(commands) == 1 and rcpts(commands) == 2)
    )
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2))
        assert outbox.round_trips == 2  # one exchange per mail
    assert received(server) == [sent(1), sent(2)]
    verbs = server.verbs()
    start = verbs.index("MAIL")
    assert verbs[start:] == ["MAIL", "RCPT", "BDAT", "MAIL", "RCPT", "BDAT", "QUIT"]


def test_the_next_mail_is_ended_only_after_its_hook(server: ScriptedEsmtp) -> None:
    seen: list[list[str]] = []
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2), before_final=lambda: seen.append(list(server.received)))
    # When the hook ran, the second mail's envelope was out and its content not ended.
    assert last_chunks(seen[0]) == 1
    assert count("RCPT")(seen[0]) == 2


def test_a_failing_hook_abandons_the_mail_without_ending_it(server: ScriptedEsmtp) -> None:
    def fail() -> None:
        raise RuntimeError("the claim was lost")

    outbox = outbox_for(server)
    outbox.open()
    outbox.deliver(document(1), more_follows=True)
    with pytest.raises(RuntimeError, match="claim was lost"):
        outbox.deliver(document(2), before_final=fail)
    assert not outbox.is_open  # dropped, never QUIT: the server keeps nothing
    server.wait_for_sessions_ended(1)
    assert last_chunks(server.received) == 1
    assert received(server) == [sent(1)]


@pytest.mark.parametrize(
    ("verb", "code", "kind"),
    [
        ("MAIL", 451, SessionRefused),
        ("MAIL", 553, SessionRefused),
        ("RCPT", 450, SessionRefused),
        ("RCPT", 550, SessionRefused),
        ("BDAT", 421, DeliveryDeferred),
        ("BDAT", 452, DeliveryDeferred),
        ("BDAT", 554, DeliveryRejected),
    ],
)
def test_pipelined_answers_are_classified_as_the_contract_says(
    server: ScriptedEsmtp, verb: str, code: int, kind: type[Exception]
) -> None:
    server.fail_next(verb, code, "scripted refusal")
    with outbox_for(server) as outbox, pytest.raises(Exception) as caught:
        outbox.deliver(document(1))
    assert type(caught.value) is kind
    assert f"{code} scripted refusal" in str(caught.value)
    if isinstance(caught.value, DeliveryRefused):
        assert caught.value.sha256 == document(1).sha256
        assert caught.value.permanent is (code >= 500)
    assert received(server) == []


@pytest.mark.parametrize(("verb", "code"), [("MAIL", 451), ("RCPT", 550)])
def test_a_refused_envelope_written_ahead_refuses_the_session(
    server: ScriptedEsmtp, verb: str, code: int
) -> None:
    server.fail_at(verb, 3, code)
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2), more_follows=True)
        with pytest.raises(SessionRefused, match=str(code)):
            outbox.deliver(document(3))
    # Refused before its content: nothing of the third mail went out.
    assert received(server) == [sent(1), sent(2)]
    assert last_chunks(server.received) == 2


@pytest.mark.parametrize(("code", "kind"), [(452, DeliveryDeferred), (554, DeliveryRejected)])
def test_after_a_refused_content_the_session_carries_the_next_mail(
    server: ScriptedEsmtp, code: int, kind: type[DeliveryRefused]
) -> None:
    server.fail_next("BDAT", code)
    with outbox_for(server) as outbox:
        with pytest.raises(kind):
            outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2))
    assert received(server) == [sent(2)]
    assert "RSET" in server.verbs()


def test_a_large_mail_goes_out_in_chunks_and_arrives_whole(server: ScriptedEsmtp) -> None:
    big = replace(document(5), content=b"%PDF-1.7\n" + bytes(range(256)) * 12_000)
    server.hold_until = last_chunks_seen(1)
    with outbox_for(server) as outbox:
        outbox.deliver(big)
        assert outbox.round_trips == 1
    chunks = [line for line in server.received if line.startswith("BDAT")]
    assert len(chunks) >= 3 and chunks[-1].endswith("LAST")
    assert not any(line.endswith("LAST") for line in chunks[:-1])
    assert received(server) == [_undated(_expected(big))]


def test_without_chunking_the_envelope_ends_in_data(server: ScriptedEsmtp) -> None:
    server.chunking = False
    server.hold_until = lambda commands: count("DATA")(commands) >= 1
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2))
        assert outbox.round_trips == 4  # DATA waits for its 354
    assert received(server) == [sent(1), sent(2)]
    verbs = server.verbs()
    start = verbs.index("MAIL")
    assert verbs[start:] == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize(
    ("verb", "code", "kind"),
    [
        ("DATA", 451, DeliveryDeferred),
        ("DOT", 452, DeliveryDeferred),
        ("DOT", 554, DeliveryRejected),
    ],
)
def test_without_chunking_answers_to_the_content_are_classified(
    server: ScriptedEsmtp, verb: str, code: int, kind: type[DeliveryRefused]
) -> None:
    server.chunking = False
    server.fail_next(verb, code)
    with outbox_for(server) as outbox:
        with pytest.raises(kind):
            outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2))
    assert received(server) == [sent(2)]


def test_without_pipelining_each_command_waits_for_its_answer(server: ScriptedEsmtp) -> None:
    server.pipelining = server.chunking = False
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.deliver(document(2))
    assert received(server) == [sent(1), sent(2)]
    # Every command arrived after the answer to the one before it.
    mails = [at for at, verb in enumerate(server.verbs()) if verb in ("MAIL", "RCPT", "DATA")]
    answered = [server.answered_before[at] for at in mails]
    assert answered == sorted(set(answered))


def test_a_notice_after_forwards_drops_the_envelope_written_ahead(server: ScriptedEsmtp) -> None:
    notice = EmailMessage()
    notice["From"], notice["To"], notice["Subject"] = FORWARD_FROM, "ops@shop.example", "n"
    notice.set_content(".a line that starts with a dot\n")
    with outbox_for(server) as outbox:
        outbox.deliver(document(1), more_follows=True)
        outbox.send(notice, recipient="ops@shop.example")
    assert received(server)[0] == sent(1)
    assert b"\r\n.a line that starts with a dot\r\n" in server.messages[1]
    assert server.received.count("RCPT TO:<ops@shop.example>") == 1


def _undated(raw: bytes) -> bytes:
    """The mail without its Date header and MIME boundary: built twice, a mail may
    differ in those."""
    raw = re.sub(rb"(?m)^Date: [^\r\n]*\r\n", b"", raw)
    return re.sub(rb"={15}\d+==", b"=boundary=", raw)


def sent(number: int) -> bytes:
    return _undated(mail(number).as_bytes())


def received(server: ScriptedEsmtp) -> list[bytes]:
    return [_undated(raw) for raw in server.messages]


def last_chunks_seen(number: int) -> Callable[[list[str]], bool]:
    return lambda commands: last_chunks(commands) >= number


def _expected(parcel: Parcel) -> bytes:
    return build_forward(parcel, forward_to=FORWARD_TO, forward_from=FORWARD_FROM).as_bytes()
