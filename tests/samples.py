"""Builders of realistic test data: invoice PDFs like Printout Designer's, and their mails.

Everything here is deterministic for equal arguments, so tests can compare bytes.
"""

from __future__ import annotations

import html
import io
import random
import struct
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP, default
from email.utils import format_datetime

from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

DEFAULT_CREATED = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)
DEFAULT_PRODUCER = "Printout Designer"
DEFAULT_LINES: tuple[tuple[str, str], ...] = (
    ("Organic cotton T-shirt, size M", "29.00"),
    ("Canvas tote bag", "15.00"),
    ("Gift wrapping", "5.00"),
    ("Shipping (standard)", "50.00"),
)

# The invoice-number label and a few words of each language a shop may print in.
LABELS: Mapping[str, Mapping[str, str]] = {
    "en": {"title": "Invoice No.", "date": "Date", "total": "Total", "thanks": "Thank you!"},
    "de": {"title": "Rechnung Nr.", "date": "Datum", "total": "Summe", "thanks": "Vielen Dank!"},
    "fr": {"title": "Facture N°", "date": "Date", "total": "Total", "thanks": "Merci !"},
    "es": {"title": "Factura nº", "date": "Fecha", "total": "Total", "thanks": "¡Gracias!"},
    "it": {"title": "Fattura n.", "date": "Data", "total": "Totale", "thanks": "Grazie!"},
    "nl": {"title": "Factuur nr.", "date": "Datum", "total": "Totaal", "thanks": "Bedankt!"},
}

_LOGO_SIDE = 96


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def logo_png(*, seed: int = 7, side: int = _LOGO_SIDE) -> bytes:
    """A square RGB PNG drawn by hand: a colour gradient with a grain texture.

    The grain keeps it from compressing to nothing, so the PDF has a realistic size.
    """
    grain = random.Random(seed).randbytes(side * side)
    rows = bytearray()
    for y in range(side):
        rows.append(0)  # PNG filter type "None" for the row
        for x in range(side):
            noise = grain[y * side + x] & 0x1F
            rows += bytes(((40 + 2 * x + noise) & 0xFF, (90 + y + noise) & 0xFF, 160 + noise))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + _png_chunk(b"IEND", b"")
    )


_LOGO = logo_png()


def _new_document(created: datetime | None, producer: str | None) -> FPDF:
    pdf = FPDF(format="A4")
    pdf.set_creation_date(created or DEFAULT_CREATED)
    pdf.set_producer(producer or DEFAULT_PRODUCER)
    pdf.set_creator("Printout Designer")
    pdf.set_title("Invoice")
    pdf.set_auto_page_break(auto=True, margin=20)
    return pdf


def invoice_pdf(
    *,
    number: str = "1042",
    amount: str = "99.00",
    lines: Sequence[tuple[str, str]] | None = None,
    created: datetime | None = None,
    producer: str | None = None,
    language: str = "en",
    logo: bool = True,
) -> bytes:
    """An invoice as Printout Designer renders it: shop, address, number, lines, total, logo.

    `created` and `producer` change metadata only: two renders that differ only in
    them differ in bytes but not in what the pages show.
    """
    labels = LABELS[language]
    pdf = _new_document(created, producer)
    pdf.add_page()
    if logo:
        pdf.image(io.BytesIO(_LOGO), x=15, y=12, w=24, h=24)
    pdf.set_font("Helvetica", "B", 18)
    pdf.set_xy(45, 14)
    pdf.cell(0, 8, "Kestrel & Finch Outfitters")
    pdf.set_font("Helvetica", "", 10)
    for offset, text in enumerate(
        ("12 Harbour Street", "Bristol BS1 4DJ, United Kingdom", "VAT GB 123 4567 89")
    ):
        pdf.set_xy(45, 23 + 5 * offset)
        pdf.cell(0, 5, text)
    pdf.set_xy(15, 50)
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, f"{labels['title']} {number}")
    pdf.set_font("Helvetica", "", 10)
    pdf.set_xy(15, 59)
    pdf.cell(0, 5, f"{labels['date']}: 2024-05-06")
    pdf.set_xy(15, 66)
    pdf.multi_cell(80, 5, "Bill to:\nAda Lovelace\n7 Analytical Row\nLondon NW1 2AB")
    pdf.set_y(96)
    pdf.set_font("Helvetica", "B", 10)
    pdf.cell(140, 7, "Item", border="B")
    pdf.cell(40, 7, "Amount (EUR)", border="B", align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    for description, price in DEFAULT_LINES if lines is None else lines:
        pdf.cell(140, 7, description)
        pdf.cell(40, 7, price, align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(140, 9, labels["total"], border="T")
    pdf.cell(40, 9, amount, border="T", align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(10)
    pdf.set_font("Helvetica", "I", 9)
    pdf.cell(0, 5, labels["thanks"])
    return bytes(pdf.output())


def textless_pdf(*, created: datetime | None = None) -> bytes:
    """A scanned-looking page: one image, no text at all."""
    pdf = _new_document(created, None)
    pdf.add_page()
    pdf.image(io.BytesIO(_LOGO), x=20, y=20, w=170, h=170)
    return bytes(pdf.output())


def encrypted_pdf(
    *,
    user_password: str = "s3cret",
    owner_password: str = "owner",
) -> bytes:
    """An invoice encrypted with RC4. With `user_password=""` it opens without a password."""
    pdf = _new_document(None, None)
    pdf.set_encryption(owner_password=owner_password, user_password=user_password)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, "Invoice No. 7001")
    return bytes(pdf.output())


def truncated_pdf(*, keep: float = 0.5) -> bytes:
    """An invoice cut off part way (a download or transfer that stopped)."""
    data = invoice_pdf()
    return data[: int(len(data) * keep)]


def corrupt_pdf() -> bytes:
    """An invoice with garbage written over the middle of the file (same length)."""
    data = bytearray(invoice_pdf())
    start, end = len(data) // 3, 2 * len(data) // 3
    data[start:end] = random.Random(3).randbytes(end - start)
    return bytes(data)


def resaved_with_pypdf(data: bytes) -> bytes:
    """The same document written again by pypdf: objects renumbered, streams recompressed."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    for page in writer.pages:
        page.compress_content_streams(level=9)
    writer.add_metadata({"/Producer": "pypdf resave", "/ModDate": "D:20250101000000Z"})
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def joined_pdf(*documents: bytes) -> bytes:
    """The pages of `documents`, in order, as one PDF (a multi-page invoice, say)."""
    writer = PdfWriter()
    for data in documents:
        for page in PdfReader(io.BytesIO(data)).pages:
            writer.add_page(page)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


# --- mails -----------------------------------------------------------------------------

DEFAULT_SENDER = "Printout Designer <invoices@shop.example>"
DEFAULT_TO = "invoices@shop.example"
DEFAULT_DATE = datetime(2024, 5, 6, 9, 31, tzinfo=UTC)


def _as_bytes(message: EmailMessage) -> bytes:
    """The mail with CRLF line endings and boundaries that do not change between runs."""
    for number, part in enumerate(message.walk(), start=1):
        if part.is_multipart() and part.get_content_type() != "message/rfc822":
            part.set_boundary(f"=_invoice-relay-test-{number:02d}")
    return message.as_bytes(policy=SMTP)


def _base_message(
    *,
    sender: str,
    to: str,
    subject: str,
    message_id: str | None,
    date: datetime | None,
    extra_headers: Mapping[str, str] | None,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(date or DEFAULT_DATE)
    message["Message-ID"] = message_id or "<invoice-1042.20240506093100@shop.example>"
    for name, value in (extra_headers or {}).items():
        message[name] = value
    return message


def _body(message: EmailMessage, text: str) -> None:
    message.set_content(text)
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines())
    message.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")


_BODY_TEXT = "Hello,\nplease find your invoice attached.\nKestrel & Finch Outfitters"


def invoice_mail(
    *,
    pdfs: Sequence[tuple[str, bytes]],
    sender: str = DEFAULT_SENDER,
    to: str = DEFAULT_TO,
    subject: str = "Invoice 1042",
    message_id: str | None = None,
    date: datetime | None = None,
    pdf_content_type: str = "application/pdf",
    inline: bool = False,
    extra_headers: Mapping[str, str] | None = None,
) -> bytes:
    """A multipart/mixed mail: text and html alternative, then each PDF under its filename.

    Returns the mail with CRLF line endings, as an IMAP server stores it.
    """
    message = _base_message(
        sender=sender,
        to=to,
        subject=subject,
        message_id=message_id,
        date=date,
        extra_headers=extra_headers,
    )
    _body(message, _BODY_TEXT)
    maintype, _, subtype = pdf_content_type.partition("/")
    for filename, data in pdfs:
        message.add_attachment(
            data,
            maintype=maintype,
            subtype=subtype or "octet-stream",
            filename=filename,
            disposition="inline" if inline else "attachment",
        )
    return _as_bytes(message)


def forwarded_mail(
    inner: bytes,
    *,
    sender: str = "Bookkeeper <books@shop.example>",
    to: str = DEFAULT_TO,
    subject: str = "Fwd: Invoice 1042",
    message_id: str | None = "<fwd-1042@shop.example>",
) -> bytes:
    """A mail forwarding `inner` as a message/rfc822 attachment."""
    message = _base_message(
        sender=sender, to=to, subject=subject, message_id=message_id, date=None, extra_headers=None
    )
    message.set_content("See the forwarded invoice below.")
    message.make_mixed()
    attached = EmailMessage()
    attached.set_type("message/rfc822")
    attached.add_header("Content-Disposition", "attachment", filename="invoice.eml")
    attached.set_payload([_parse(inner)])
    message.attach(attached)
    return _as_bytes(message)


def _parse(data: bytes) -> EmailMessage:
    parsed = message_from_bytes(data, policy=default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def plain_mail(
    *,
    sender: str = DEFAULT_SENDER,
    subject: str = "Your order has shipped",
    message_id: str | None = "<plain@shop.example>",
) -> bytes:
    """A mail without any attachment."""
    message = _base_message(
        sender=sender,
        to=DEFAULT_TO,
        subject=subject,
        message_id=message_id,
        date=None,
        extra_headers=None,
    )
    _body(message, "Your order is on its way.")
    return _as_bytes(message)


def image_only_mail(*, message_id: str | None = "<image@shop.example>") -> bytes:
    """A mail carrying a PNG, not a PDF."""
    message = _base_message(
        sender=DEFAULT_SENDER,
        to=DEFAULT_TO,
        subject="Our new logo",
        message_id=message_id,
        date=None,
        extra_headers=None,
    )
    _body(message, "Here is our new logo.")
    message.add_attachment(_LOGO, maintype="image", subtype="png", filename="logo.png")
    return _as_bytes(message)


def unnamed_pdf_mail(pdf: bytes, *, message_id: str | None = "<unnamed@shop.example>") -> bytes:
    """A PDF sent as application/octet-stream with no filename at all."""
    message = _base_message(
        sender=DEFAULT_SENDER,
        to=DEFAULT_TO,
        subject="Invoice",
        message_id=message_id,
        date=None,
        extra_headers=None,
    )
    _body(message, _BODY_TEXT)
    message.add_attachment(pdf, maintype="application", subtype="octet-stream")
    attachment = list(message.iter_attachments())[-1]
    assert isinstance(attachment, EmailMessage)
    del attachment["Content-Disposition"]
    return _as_bytes(message)


def mislabelled_mail(
    name: str = "invoice.pdf",
    data: bytes = b"This is not a PDF, just some text.\r\n",
    *,
    message_id: str | None = "<mislabelled@shop.example>",
) -> bytes:
    """An attachment named like a PDF whose bytes are something else."""
    return invoice_mail(pdfs=[(name, data)], message_id=message_id)


def broken_base64_mail(
    pdf: bytes | None = None, *, message_id: str | None = "<broken64@shop.example>"
) -> bytes:
    """A PDF attachment whose base64 body is damaged: stray characters, 101 characters lost.

    The MIME structure around it stays intact.
    """
    mail = invoice_mail(pdfs=[("invoice.pdf", pdf or invoice_pdf())], message_id=message_id)
    attachment = mail.index(b"Content-Disposition: attachment")
    body_start = mail.index(b"\r\n\r\n", attachment) + 4
    body_end = mail.index(b"\r\n--", body_start)
    body = mail[body_start:body_end]
    damaged = body[:200] + b"!!**not base64**!!\r\n" + body[301:]
    return mail[:body_start] + damaged + mail[body_end:]


def missing_boundary_mail(
    pdf: bytes | None = None, *, message_id: str | None = "<noboundary@shop.example>"
) -> bytes:
    """A multipart mail whose closing boundary never comes (the mail was cut short)."""
    mail = invoice_mail(pdfs=[("invoice.pdf", pdf or invoice_pdf())], message_id=message_id)
    closing = mail.rstrip(b"\r\n").rsplit(b"\r\n", 1)[0] + b"\r\n"
    return closing
