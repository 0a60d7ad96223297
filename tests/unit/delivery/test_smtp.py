"""The forwarded mail's headers, body and attachment, and the send-rate cap."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from tests.hostile import FORWARD_HEADERS
from worker.delivery.message import (
    FILENAME_LIMIT,
    SUBJECT_LIMIT,
    ForwardMail,
    attachment_filename,
    build_forward,
    forward_message_id,
)
from worker.mail.text import clean_text
from worker.models import OutgoingDocument, Parcel
from worker.relay.pacer import SendPacer

DESTINATION = "smtp:accounting@example.test"
BOUND = "64b6eafb3b"  # the destination's part of the Message-ID
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
NOW = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
FORWARD_TO = "inbox-42@import.example.net"
FORWARD_FROM = "relay@shop.example.com"

ATTACHMENT_HEADERS = {"content-type", "content-transfer-encoding", "content-disposition"}


def make_document(**changes: object) -> Parcel:
    """The parcel the forwarder hands over for a claimed document (queue fields too, so
    that a test can show they make no difference to the mail)."""
    document = OutgoingDocument(
        document_id=7,
        sha256=SHA,
        content=b"%PDF-1.7\n" + bytes(range(256)) + b"\n%%EOF\n",
        filename="invoice-1042.pdf",
        attempts=0,
        resend_count=0,
        original_sender="Printout Designer <noreply@printout.example>",
        original_subject="Invoice #1042 from Example Shop",
        original_date=datetime(2024, 3, 5, 9, 15, tzinfo=timezone(timedelta(hours=1))),
        original_message_id="<abc.123@printout.example>",
        destination=DESTINATION,
    )
    return Parcel.from_outgoing(replace(document, **changes))  # type: ignore[arg-type]


def forward(document: Parcel) -> ForwardMail:
    return build_forward(document, forward_to=FORWARD_TO, forward_from=FORWARD_FROM, now=NOW)


def round_trip(mail: ForwardMail) -> tuple[bytes, EmailMessage]:
    """Serialise as it goes on the wire and parse it back, as a receiver would."""
    raw = mail.as_bytes()
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def only_attachment(message: EmailMessage) -> EmailMessage:
    attachments = list(message.iter_attachments())
    assert len(attachments) == 1
    part = attachments[0]
    assert isinstance(part, EmailMessage)
    return part


def body_text(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert isinstance(body, EmailMessage)
    return str(body.get_content())


# --- headers ---------------------------------------------------------------------------


def test_headers_of_a_forwarded_mail() -> None:
    raw, parsed = round_trip(forward(make_document()))

    assert {key.lower() for key in parsed} == FORWARD_HEADERS
    assert parsed["To"] == FORWARD_TO
    assert parsed["From"] == FORWARD_FROM
    assert parsed["Subject"] == "Invoice #1042 from Example Shop"
    assert parsed["Auto-Submitted"] == "auto-generated"
    # 81 characters: folded after the colon, so a reader strips the value.
    assert parsed["X-Invoice-Relay"].strip() == SHA
    assert parsed["Message-ID"] == f"<{SHA[:32]}.{BOUND}.0@invoice-relay>"
    assert parsed["Date"].datetime == NOW
    assert parsed.get_content_type() == "multipart/mixed"
    assert b"\nBcc:" not in raw and not raw.startswith(b"Bcc:")
    assert all(line.endswith(b"\r") for line in raw.split(b"\n")[:-1])  # CRLF on the wire


def test_sha256_is_written_lower_case() -> None:
    _, parsed = round_trip(forward(make_document(sha256=SHA.upper())))
    assert parsed["X-Invoice-Relay"].strip() == SHA
    assert parsed["Message-ID"] == f"<{SHA[:32]}.{BOUND}.0@invoice-relay>"


def test_relay_id_names_the_message_id_domain() -> None:
    message = build_forward(
        make_document(), forward_to=FORWARD_TO, forward_from=FORWARD_FROM, relay_id="relay.test"
    )
    assert message.message_id == f"<{SHA[:32]}.{BOUND}.0@relay.test>"


def test_date_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    message = build_forward(make_document(), forward_to=FORWARD_TO, forward_from=FORWARD_FROM)
    _, parsed = round_trip(message)
    assert before <= parsed["Date"].datetime <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("subject", "filename", "expected"),
    [
        ("Invoice 1042", "a.pdf", "Invoice 1042"),
        ("  Invoice\t 1042  ", "a.pdf", "Invoice 1042"),
        ("Rechnung Nr. 1042 \u2013 Müller GmbH", "a.pdf", "Rechnung Nr. 1042 \u2013 Müller GmbH"),
        ("Invoice\r\nBcc: victim@example.org", "a.pdf", "Invoice Bcc: victim@example.org"),
        ("Invoice\x00\x1b[31m 1042\x7f", "a.pdf", "Invoice[31m 1042"),
        ("Invoice\u2028line", "a.pdf", "Invoice line"),
        ("", "invoice-7.pdf", "Invoice invoice-7.pdf"),
        (" \r\n\t\x00 ", "invoice-7.pdf", "Invoice invoice-7.pdf"),
        ("", "", "Invoice invoice.pdf"),
        ("x" * 500, "a.pdf", "x" * SUBJECT_LIMIT),
    ],
)
def test_subject_is_cleaned(subject: str, filename: str, expected: str) -> None:
    _, parsed = round_trip(forward(make_document(original_subject=subject, filename=filename)))
    assert parsed["Subject"] == expected


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("plain", 10, "plain"),
        ("a\r\nb", 10, "a b"),
        ("a\x00b", 10, "ab"),  # worker.mail.text: a NUL vanishes, it never was a space
        ("  many   spaces  ", 20, "many spaces"),
        ("cut here please", 8, "cut here"),
        ("cut  ", 4, "cut"),
        ("\r\n", 10, ""),
    ],
)
def test_clean_text(value: str, limit: int, expected: str) -> None:
    assert clean_text(value, limit) == expected


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("invoice-1042.pdf", "invoice-1042.pdf"),
        ("Rechnung Müller.pdf", "Rechnung Müller.pdf"),
        # worker.mail.text.clean_filename: only the leaf, never a path
        ("../../etc/passwd.pdf", "passwd.pdf"),
        ("C:\\Users\\shop\\invoice.pdf", "invoice.pdf"),
        (".hidden.pdf", "hidden.pdf"),
        ("in\r\nContent-Type: text/html\r\n.pdf", "html .pdf"),
        ("in\r\nContent-Type: text html\r\n.pdf", "in Content-Type: text html .pdf"),
        ("nul\x00byte.pdf", "nulbyte.pdf"),
        ("", "invoice.pdf"),
        ("/\\\x00", "invoice.pdf"),
        ("a" * 300 + ".pdf", "a" * (FILENAME_LIMIT - 4) + ".pdf"),
        ("b" * 300, "b" * FILENAME_LIMIT),
    ],
)
def test_attachment_filename(filename: str, expected: str) -> None:
    assert attachment_filename(filename) == expected


@pytest.mark.parametrize(
    ("filename", "disposition"),
    [
        ("invoice-1042.pdf", 'attachment; filename="invoice-1042.pdf"'),
        ("Rechnung Müller.pdf", "attachment; filename*=utf-8''Rechnung%20M%C3%BCller.pdf"),
        ("請求書.pdf", "attachment; filename*=utf-8''%E8%AB%8B%E6%B1%82%E6%9B%B8.pdf"),
    ],
)
def test_attachment_filename_on_the_wire(filename: str, disposition: str) -> None:
    raw, parsed = round_trip(forward(make_document(filename=filename)))
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", raw)
    assert f"\r\nContent-Disposition: {disposition}\r\n".encode() in unfolded
    assert only_attachment(parsed).get_filename() == filename


def test_attachment_is_the_pdf_byte_for_byte() -> None:
    document = make_document()
    _, parsed = round_trip(forward(document))
    attachment = only_attachment(parsed)
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_content() == document.content


@pytest.mark.parametrize(
    "hostile",
    [
        {"original_subject": "Invoice\r\nBcc: victim@example.org\r\nX-Evil: 1"},
        {"original_subject": "Invoice\nBcc: victim@example.org"},
        {"original_subject": "Invoice\rBcc: victim@example.org"},
        {"original_subject": "Invoice\x00\r\n\r\nbody injection"},
        {"filename": "a.pdf\r\nBcc: victim@example.org\r\nX-Evil: 1"},
        {"filename": 'a.pdf"\r\nX-Evil: 1'},
        {"original_sender": "x@example.org\r\nBcc: victim@example.org\r\nX-Evil: 1"},
        {"original_message_id": "<a@b>\r\nBcc: victim@example.org"},
    ],
)
def test_header_injection_adds_no_header(hostile: dict[str, str]) -> None:
    raw, parsed = round_trip(forward(make_document(**hostile)))

    assert {key.lower() for key in parsed} == FORWARD_HEADERS
    attachment = only_attachment(parsed)
    assert {key.lower() for key in attachment} - {"mime-version"} == ATTACHMENT_HEADERS
    for line in raw.split(b"\r\n"):
        assert not line.lower().startswith((b"bcc:", b"x-evil:"))
    assert b"\x00" not in raw


def test_body_names_the_original_mail() -> None:
    _, parsed = round_trip(forward(make_document()))
    body = body_text(parsed)
    assert "Printout Designer <noreply@printout.example>" in body
    assert "Tue, 05 Mar 2024 09:15:00 +0100" in body
    assert "<abc.123@printout.example>" in body
    assert "invoice-1042.pdf" in body


def test_body_fields_are_cleaned_and_capped() -> None:
    document = make_document(
        original_sender="evil\r\n" + "s" * 1000,
        original_message_id="",
        original_date=None,
    )
    _, parsed = round_trip(forward(document))
    lines = body_text(parsed).splitlines()
    sender_line = next(line for line in lines if line.startswith("Original sender: "))
    assert sender_line.startswith("Original sender: evil sss")
    assert len(sender_line) < 400
    assert "Original Message-ID: unknown" in lines
    assert "Original date: unknown" in lines


def test_naive_original_date_is_taken_as_utc() -> None:
    _, parsed = round_trip(forward(make_document(original_date=datetime(2024, 1, 2, 3, 4, 5))))
    assert "Original date: Tue, 02 Jan 2024 03:04:05 +0000" in body_text(parsed).splitlines()


@pytest.mark.parametrize(
    "filename",
    [
        "ä" * 150 + ".pdf",
        "Rechnung " + "Müller " * 30 + ".pdf",
        "請求書" * 60 + ".pdf",
        'quote " and back\\slash ' + "x" * 120 + ".pdf",
    ],
)
def test_long_filenames_survive_the_round_trip(filename: str) -> None:
    raw, parsed = round_trip(forward(make_document(filename=filename)))
    assert only_attachment(parsed).get_filename() == attachment_filename(filename)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    "subject",
    [
        "Rechnung " * 30,
        "ü" * 200,
        "Invoice =?utf-8?b?SGk=?= literal",
        "請求書 " * 40,
        "a" * 150 + " " + "b" * 10,
    ],
)
def test_long_and_encoded_subjects_survive_the_round_trip(subject: str) -> None:
    raw, parsed = round_trip(forward(make_document(original_subject=subject)))
    assert parsed["Subject"] == clean_text(subject, SUBJECT_LIMIT)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii()


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 57 * 1000, 57 * 1000 + 5, 300_001])
@pytest.mark.parametrize("slice_size", [78, 1000, 1 << 20])
def test_attachment_slices_are_the_pdf_in_base64_lines(size: int, slice_size: int) -> None:
    content = bytes(range(256)) * (size // 256 + 1)
    mail = forward(make_document(content=content[:size]))
    encoded = b"".join(mail.attachment_slices(slice_size))
    lines = encoded.split(b"\r\n")
    assert lines[-1] == b""  # every line ends in CRLF
    assert all(len(line) == 76 for line in lines[:-2])
    assert base64.b64decode(b"".join(lines)) == content[:size]
    _, parsed = round_trip(mail)
    assert only_attachment(parsed).get_content() == content[:size]


def test_text_part_lines_are_short_and_a_leading_dot_is_kept() -> None:
    document = make_document(original_sender="." + "x" * 299, original_message_id=".<a@b>")
    raw, parsed = round_trip(forward(document))
    assert "Original Message-ID: .<a@b>" in body_text(parsed).splitlines()
    text = raw.split(b"quoted-printable\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    assert max(len(line) for line in text.split(b"\r\n")) <= 76


def test_addresses_that_cannot_be_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="From"):
        build_forward(make_document(), forward_to=FORWARD_TO, forward_from="a@b\r\nBcc: c@d")
    with pytest.raises(ValueError, match="To"):
        build_forward(make_document(), forward_to="", forward_from=FORWARD_FROM)


# --- Message-ID -----------------------------------------------------------------------


def test_message_id_is_deterministic() -> None:
    first = forward(make_document(attempts=0))
    retry = build_forward(
        make_document(attempts=3),
        forward_to=FORWARD_TO,
        forward_from=FORWARD_FROM,
        now=NOW + timedelta(hours=2),
    )
    assert first.message_id == retry.message_id


def test_message_id_differs_with_resend_count() -> None:
    ids = {forward(make_document(resend_count=count)).message_id for count in range(4)}
    assert len(ids) == 4


def test_message_id_differs_with_the_pdf() -> None:
    other = "0" * 64
    assert forward(make_document()).message_id != forward(make_document(sha256=other)).message_id


def test_message_id_differs_with_the_destination() -> None:
    # One PDF to two destinations is two deliveries (one receiver may read both inboxes).
    ids = {
        forward(make_document(destination=destination)).message_id
        for destination in (DESTINATION, "getmyinvoices:G-1", None)
    }
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("sha256", "resend_count", "destination", "expected"),
    [
        (SHA, 0, "smtp:a@example.test", f"<{SHA[:32]}.4dbddb5a7b.0@invoice-relay>"),
        (SHA, 2, "smtp:a@example.test", f"<{SHA[:32]}.4dbddb5a7b.2@invoice-relay>"),
        (SHA, 2, "getmyinvoices:G-1", f"<{SHA[:32]}.4b69ef1682.2@invoice-relay>"),
        ("ABCDEF", 1, "smtp:a@example.test", "<abcdef.4dbddb5a7b.1@invoice-relay>"),
        # A document older than destinations keeps the form it had: its retries stay
        # one delivery across the upgrade.
        (SHA, 0, None, f"<{SHA[:32]}.0@invoice-relay>"),
        ("ABCDEF", 1, None, "<abcdef.1@invoice-relay>"),
    ],
)
def test_forward_message_id(
    sha256: str, resend_count: int, destination: str | None, expected: str
) -> None:
    message_id = forward_message_id(sha256, resend_count, destination=destination)
    assert message_id == expected
    assert re.fullmatch(r"<[0-9a-f]{1,32}(\.[0-9a-f]{10})?\.\d+@invoice-relay>", message_id)


def test_forward_message_id_refuses_an_empty_destination() -> None:
    with pytest.raises(ValueError, match="destination"):
        forward_message_id(SHA, 0, destination="")


@pytest.mark.parametrize(
    ("sha256", "resend_count", "relay_id"),
    [
        ("not-hex", 0, "invoice-relay"),
        ("", 0, "invoice-relay"),
        (SHA + "\r\nBcc: x", 0, "invoice-relay"),
        (SHA, -1, "invoice-relay"),
        (SHA, 0, "relay>\r\nX: y"),
        (SHA, 0, ""),
    ],
)
def test_forward_message_id_refuses_bad_input(
    sha256: str, resend_count: int, relay_id: str
) -> None:
    with pytest.raises(ValueError, match=r"sha256|resend_count|relay_id"):
        forward_message_id(sha256, resend_count, relay_id=relay_id)


# --- the send-rate cap -----------------------------------------------------------------


class FakeTime:
    """A clock that only moves when slept on or told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(
    ("max_per_minute", "requested_at", "sent_at"),
    [
        (None, [0, 0, 0, 0], [0, 0, 0, 0]),
        (1, [0, 0, 0], [0, 60, 120]),
        (1, [0, 30, 200], [0, 60, 200]),
        (2, [0, 0, 0], [0, 0, 60]),
        (2, [0, 10, 20, 30], [0, 10, 60, 70]),
        (3, [0, 59.5, 59.9, 60, 61], [0, 59.5, 59.9, 60, 119.5]),
        (30, [0] * 31, [0] * 30 + [60]),
        (2, [0, 100, 100, 100], [0, 100, 100, 160]),
    ],
)
def test_send_pacer(
    max_per_minute: int | None, requested_at: list[float], sent_at: list[float]
) -> None:
    fake = FakeTime()
    pacer = SendPacer(max_per_minute, clock=fake.clock, sleep=fake.sleep)
    actual: list[float] = []
    for moment in requested_at:
        fake.now = max(fake.now, moment)
        pacer.wait()
        actual.append(fake.now)

    assert actual == pytest.approx(sent_at)
    if max_per_minute is not None:
        for start in actual:
            in_window = [moment for moment in actual if start <= moment < start + 60]
            assert len(in_window) <= max_per_minute


def test_send_pacer_delay_reports_the_wait() -> None:
    fake = FakeTime()
    pacer = SendPacer(2, clock=fake.clock, sleep=fake.sleep)
    pacer.wait()
    fake.now = 15
    pacer.wait()
    assert pacer.delay() == pytest.approx(45)
    fake.now = 60
    assert pacer.delay() == 0
    assert fake.sleeps == []


def test_send_pacer_survives_a_short_sleep() -> None:
    fake = FakeTime()

    def short_sleep(seconds: float) -> None:
        fake.sleep(seconds / 2)  # a sleep interrupted half-way

    pacer = SendPacer(1, clock=fake.clock, sleep=short_sleep)
    pacer.wait()
    pacer.wait()
    assert fake.now >= 60


@pytest.mark.parametrize("limit", [0, -1])
def test_send_pacer_refuses_a_cap_below_one(limit: int) -> None:
    with pytest.raises(ValueError, match="max_per_minute"):
        SendPacer(limit)
