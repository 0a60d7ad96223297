"""SmtpOutbox against a real aiosmtpd server on loopback: TLS, login, and SMTP answers."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.servers.smtp_sink import SmtpSink, free_port, running_sink
from tests.servers.tls import TestCA, make_ca
from worker.config.environment import Secret
from worker.delivery.message import ForwardMail, build_forward
from worker.delivery.smtp import SmtpOutbox
from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryRejected,
    DeliveryUncertain,
    SessionRefused,
)
from worker.models import Parcel, PasswordCredentials, Security

pytestmark = pytest.mark.integration

FORWARD_TO = "inbox-42@import.example.net"
FORWARD_FROM = "relay@shop.example.com"
USER = "relay-user"
PASSWORD = "s3cret-Passw0rd"


def document(number: int) -> Parcel:
    sha256 = f"{number:064x}"
    return Parcel(
        sha256=sha256,
        content=b"%PDF-1.7\n" + sha256.encode() + b"\n%%EOF\n",
        filename=f"invoice-{number}.pdf",
        resend_count=0,
        original_sender="Printout Designer <noreply@printout.example>",
        original_subject=f"Invoice {number}",
        original_date=datetime(2024, 3, 5, tzinfo=UTC),
        original_message_id=f"<{number}@printout.example>",
    )


def mail(number: int) -> ForwardMail:
    return build_forward(document(number), forward_to=FORWARD_TO, forward_from=FORWARD_FROM)


def outbox_for(
    sink: SmtpSink,
    *,
    security: Security = Security.NONE,
    user: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    timeout: float = 5.0,
) -> SmtpOutbox:
    return SmtpOutbox(
        host=sink.host,
        port=sink.port,
        security=security,
        credentials=None
        if user is None
        else PasswordCredentials(user=user, password=Secret(password or "")),
        forward_from=FORWARD_FROM,
        forward_to=FORWARD_TO,
        ca_file=ca_file,
        timeout=timeout,
    )


def relayed(sink: SmtpSink) -> list[str]:
    """The X-Invoice-Relay value of every mail the sink accepted, in order."""
    return [str(received.message["X-Invoice-Relay"]).strip() for received in sink.messages]


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with running_sink() as started:
        yield started


@pytest.fixture
def tls_sink(test_ca: TestCA) -> Iterator[SmtpSink]:
    with running_sink(tls_cert=(test_ca.cert_file, test_ca.key_file)) as started:
        yield started


# --- sessions ----------------------------------------------------------------------------


def test_plain_send_delivers_the_mail(sink: SmtpSink) -> None:
    message = mail(1)
    with outbox_for(sink) as outbox:
        answer = outbox.send(message)

    assert answer == "250 2.0.0 OK queued as sink-1"
    [received] = sink.messages
    assert received.mail_from == FORWARD_FROM
    assert received.rcpt_tos == (FORWARD_TO,)
    assert received.message["Message-ID"] == message.message_id
    assert received.message["Bcc"] is None
    [attachment] = received.message.iter_attachments()
    assert isinstance(attachment, EmailMessage)
    assert attachment.get_content() == document(1).content
    assert attachment.get_filename() == "invoice-1.pdf"


def test_starttls_with_ca_file(tls_sink: SmtpSink, test_ca: TestCA) -> None:
    with outbox_for(tls_sink, security=Security.STARTTLS, ca_file=test_ca.ca_file) as outbox:
        outbox.send(mail(2))
    assert relayed(tls_sink) == [document(2).sha256]


def test_starttls_without_ca_file_names_the_certificate(tls_sink: SmtpSink) -> None:
    outbox = outbox_for(tls_sink, security=Security.STARTTLS)
    with pytest.raises(SessionRefused, match="certificate not trusted") as caught:
        outbox.open()
    assert "INVOICE_RELAY_CA_FILE" in str(caught.value)
    assert caught.value.port == tls_sink.port
    assert not outbox.is_open
    assert tls_sink.messages == []


def test_starttls_refused_when_the_server_does_not_offer_it(sink: SmtpSink) -> None:
    outbox = outbox_for(sink, security=Security.STARTTLS)
    with pytest.raises(SessionRefused, match="does not offer STARTTLS"):
        outbox.open()
    assert not outbox.is_open


def test_implicit_tls(test_ca: TestCA) -> None:
    tls_cert = (test_ca.cert_file, test_ca.key_file)
    with running_sink(tls_cert=tls_cert, implicit_tls=True) as sink:
        with outbox_for(sink, security=Security.SSL, ca_file=test_ca.ca_file) as outbox:
            outbox.send(mail(3))
        with pytest.raises(SessionRefused, match="certificate not trusted"):
            outbox_for(sink, security=Security.SSL).open()
        assert relayed(sink) == [document(3).sha256]


def test_implicit_tls_against_a_plain_server_fails_cleanly(sink: SmtpSink) -> None:
    with pytest.raises(SessionRefused, match=r"TLS|closed") as caught:
        outbox_for(sink, security=Security.SSL, timeout=2.0).open()
    assert caught.value.__cause__ is not None


def test_login_over_starttls(test_ca: TestCA) -> None:
    tls_cert = (test_ca.cert_file, test_ca.key_file)
    with running_sink(tls_cert=tls_cert, auth=(USER, PASSWORD)) as sink:
        outbox = outbox_for(
            sink,
            security=Security.STARTTLS,
            user=USER,
            password=PASSWORD,
            ca_file=test_ca.ca_file,
        )
        with outbox:
            outbox.send(mail(4))
        assert sink.logins == [USER]
        assert relayed(sink) == [document(4).sha256]


@pytest.mark.parametrize(
    ("user", "password"), [(USER, "wrong-password-123"), ("someone-else", PASSWORD)]
)
def test_login_refused_keeps_the_password_out(user: str, password: str) -> None:
    with running_sink(auth=(USER, PASSWORD)) as sink:
        outbox = outbox_for(sink, user=user, password=password)
        with pytest.raises(SessionRefused, match="login refused") as caught:
            outbox.open()
        assert password not in str(caught.value)
        assert password not in repr(outbox)
        assert "INVOICE_RELAY_SMTP_USER" in str(caught.value)
        assert sink.logins == []


# Postfix takes this as UTF-8 with AUTH PLAIN; smtplib's own login would fail to
# encode it and quote one of its characters in the traceback.
UTF8_PASSWORD = "pässwörd-€-" + PASSWORD


def secret_characters_in(text: str, secret: str) -> set[str]:
    """The characters of `secret` that no ASCII setting name or message would hold."""
    return {char for char in secret if not char.isascii() and char in text}


def test_a_utf8_password_logs_in_with_auth_plain() -> None:
    with running_sink(auth=(USER, UTF8_PASSWORD)) as sink:
        with outbox_for(sink, user=USER, password=UTF8_PASSWORD) as outbox:
            outbox.send(mail(80))
        assert sink.logins == [USER]
        assert relayed(sink) == [document(80).sha256]


@pytest.mark.parametrize(
    ("excluded", "expected"),
    [
        ((), "login refused"),
        # Only AUTH LOGIN offered: nothing carries UTF-8, and the server is never asked.
        (("PLAIN",), "no login that can carry them"),
    ],
)
def test_a_utf8_password_that_fails_is_named_without_a_character_of_it(
    excluded: tuple[str, ...], expected: str
) -> None:
    wrong = "wröng-" + UTF8_PASSWORD
    with running_sink(auth=(USER, UTF8_PASSWORD), auth_excluded=excluded) as sink:
        outbox = outbox_for(sink, user=USER, password=wrong)
        with pytest.raises(SessionRefused, match=expected) as caught:
            outbox.open()
        told = "".join(traceback.format_exception(caught.value))
        assert secret_characters_in(told, wrong) == set()
        assert wrong not in told
        assert f"{sink.host}:{sink.port}" in str(caught.value)
        assert "INVOICE_RELAY_SMTP_USER" in str(caught.value)
        assert sink.logins == []


def test_connection_refused_when_nothing_listens() -> None:
    port = free_port()
    outbox = SmtpOutbox(
        host="127.0.0.1",
        port=port,
        security=Security.NONE,
        credentials=None,
        forward_from=FORWARD_FROM,
        forward_to=FORWARD_TO,
        timeout=2.0,
    )
    with pytest.raises(SessionRefused, match="connection refused") as caught:
        outbox.open()
    assert caught.value.host == "127.0.0.1"
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_missing_ca_file_is_named(tls_sink: SmtpSink, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(SessionRefused, match="INVOICE_RELAY_CA_FILE"):
        outbox_for(tls_sink, security=Security.STARTTLS, ca_file=missing).open()


def test_outage_then_recovery(sink: SmtpSink) -> None:
    sink.stop()
    with pytest.raises(SessionRefused, match="connection refused"):
        outbox_for(sink).open()
    sink.start()
    with outbox_for(sink) as outbox:
        outbox.send(mail(5))
    assert relayed(sink) == [document(5).sha256]


def test_send_before_open_is_refused(sink: SmtpSink) -> None:
    with pytest.raises(SessionRefused, match="not open"):
        outbox_for(sink).send(mail(6))


# --- answers to one mail -----------------------------------------------------------------


def test_temporary_refusal_at_data_keeps_the_session(sink: SmtpSink) -> None:
    sink.fail_next(451, "4.3.0 try again later", stage="data")
    with outbox_for(sink) as outbox:
        with pytest.raises(DeliveryRefused) as caught:
            outbox.send(mail(7))
        assert caught.value.code == 451
        assert not caught.value.permanent
        assert "try again later" in str(caught.value)
        assert caught.value.sha256 == document(7).sha256
        assert outbox.is_open
        outbox.send(mail(8))

    assert relayed(sink) == [document(8).sha256]


def test_permanent_refusal_at_data(sink: SmtpSink) -> None:
    sink.fail_next(550, "5.7.1 content rejected", stage="data")
    with outbox_for(sink) as outbox:
        with pytest.raises(DeliveryRefused, match="content rejected") as caught:
            outbox.send(mail(9))
        outbox.send(mail(10))

    assert caught.value.code == 550
    assert caught.value.permanent
    assert relayed(sink) == [document(10).sha256]


def test_refusal_of_the_recipient_refuses_the_session(sink: SmtpSink) -> None:
    sink.fail_next(550, "5.1.1 no such mailbox", stage="rcpt")
    outbox = outbox_for(sink)
    with outbox, pytest.raises(SessionRefused, match="recipient") as caught:
        outbox.send(mail(11))
    assert "INVOICE_RELAY_FORWARD_TO" in str(caught.value)
    assert "no such mailbox" in str(caught.value)
    assert sink.messages == []


@pytest.mark.parametrize("code", [451, 553])
def test_refusal_of_the_sender_refuses_the_session(sink: SmtpSink, code: int) -> None:
    sink.fail_next(code, "sender not allowed", stage="mail")
    with outbox_for(sink) as outbox, pytest.raises(SessionRefused, match="FORWARD_FROM"):
        outbox.send(mail(12))
    assert sink.messages == []


def test_connection_lost_during_data_is_temporary_and_closes(sink: SmtpSink) -> None:
    sink.drop_next(stage="data")
    outbox = outbox_for(sink)
    with outbox:
        with pytest.raises(DeliveryRefused, match="connection lost during send") as caught:
            outbox.send(mail(13))
        assert caught.value.code == 451
        assert isinstance(caught.value, DeliveryUncertain)  # it may have arrived
        assert not outbox.is_open
        with pytest.raises(SessionRefused, match="not open"):
            outbox.send(mail(14))
    with outbox:
        outbox.send(mail(14))
    assert relayed(sink) == [document(14).sha256]


def test_no_answer_in_time_during_data_is_temporary(sink: SmtpSink) -> None:
    sink.stall_next(3.0)
    with outbox_for(sink, timeout=0.5) as outbox:
        with pytest.raises(DeliveryRefused, match="connection lost during send") as caught:
            outbox.send(mail(15))
        assert caught.value.code == 451
        assert isinstance(caught.value, DeliveryUncertain)  # it may have arrived
        assert not outbox.is_open


def test_selective_and_seeded_refusals(sink: SmtpSink) -> None:
    refused = {document(21).sha256}
    sink.fail_matching(
        lambda message: str(message["X-Invoice-Relay"]).strip() in refused, 554, "5.6.0 bad"
    )
    outcomes: dict[int, int | None] = {}
    with outbox_for(sink) as outbox:
        for number in (20, 21, 22):
            try:
                outbox.send(mail(number))
                outcomes[number] = 250
            except DeliveryRefused as exc:
                outcomes[number] = exc.code

    assert outcomes == {20: 250, 21: 554, 22: 250}
    assert relayed(sink) == [document(20).sha256, document(22).sha256]
    assert sink.refusals == [("data", 554)]


def test_fail_rate_is_reproducible(sink: SmtpSink) -> None:
    def run() -> list[int | None]:
        sink.clear_failures()
        sink.fail_rate(0.5, 452, seed=7)
        codes: list[int | None] = []
        with outbox_for(sink) as outbox:
            for number in range(30, 50):
                try:
                    outbox.send(mail(number))
                    codes.append(250)
                except DeliveryRefused as exc:
                    codes.append(exc.code)
        return codes

    first, second = run(), run()
    assert first == second
    assert 0 < first.count(452) < len(first)
    accepted = [number for number, code in zip(range(30, 50), first, strict=True) if code == 250]
    assert relayed(sink) == [document(number).sha256 for number in accepted] * 2


def test_resend_carries_a_new_message_id(sink: SmtpSink) -> None:
    first = mail(60)
    again = build_forward(
        replace(document(60), resend_count=1), forward_to=FORWARD_TO, forward_from=FORWARD_FROM
    )
    with outbox_for(sink) as outbox:
        outbox.send(first)
        outbox.send(again)
    ids = [received.message["Message-ID"] for received in sink.messages]
    assert ids == [first.message_id, again.message_id]
    assert ids[0] != ids[1]


def test_before_end_runs_before_the_mail_is_accepted(sink: SmtpSink) -> None:
    seen: list[int] = []
    with outbox_for(sink) as outbox:
        outbox.send(mail(70), before_end=lambda: seen.append(len(sink.messages)))
    assert seen == [0]  # the server had not accepted the mail yet
    assert relayed(sink) == [document(70).sha256]


def test_a_failing_before_end_abandons_the_mail(sink: SmtpSink) -> None:
    def fail() -> None:
        raise RuntimeError("the mark of the last mail failed")

    with outbox_for(sink) as outbox:
        with pytest.raises(RuntimeError, match="mark of the last mail"):
            outbox.send(mail(71), before_end=fail)
        assert not outbox.is_open  # mid-DATA: the session is dropped, never QUIT
        outbox.open()
        outbox.send(mail(72))
    assert relayed(sink) == [document(72).sha256]


def test_deliver_builds_the_mail_and_its_receipt_names_the_message_id(sink: SmtpSink) -> None:
    seen: list[int] = []
    with outbox_for(sink) as outbox:
        receipt = outbox.deliver(document(73), before_final=lambda: seen.append(len(sink.messages)))
    assert seen == [0]  # before_final is the port's name for "before the dot"
    (received,) = sink.messages
    assert receipt.delivery_id == received.message["Message-ID"] == mail(73).message_id
    assert receipt.answer.startswith("250")
    assert received.message["To"] == FORWARD_TO
    assert relayed(sink) == [document(73).sha256]


@pytest.mark.parametrize(
    ("code", "kind"),
    [(451, DeliveryDeferred), (452, DeliveryDeferred), (550, DeliveryRejected)],
)
def test_deliver_classifies_answers_to_the_content(
    sink: SmtpSink, code: int, kind: type[DeliveryRefused]
) -> None:
    sink.fail_next(code, "not now or never")
    with outbox_for(sink) as outbox, pytest.raises(DeliveryRefused) as caught:
        outbox.deliver(document(74))
    assert type(caught.value) is kind
    assert caught.value.permanent is (code >= 500)
    assert caught.value.sha256 == document(74).sha256


def test_a_large_mail_goes_out_in_slices_and_arrives_whole(sink: SmtpSink) -> None:
    content = b"%PDF-1.7\n" + bytes(range(256)) * 12_000 + b"\n%%EOF\n"  # 3 MB
    large = replace(document(73), content=content)
    with outbox_for(sink) as outbox:
        outbox.send(build_forward(large, forward_to=FORWARD_TO, forward_from=FORWARD_FROM))
    [received] = sink.messages
    [attachment] = received.message.iter_attachments()
    assert isinstance(attachment, EmailMessage)
    assert attachment.get_content() == content
