"""The benchmark's mail: Printout-Designer-like invoices, a fifth of them resent.

Deterministic for equal arguments, so two folders filled from it hold the same bytes.
"""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta

from fpdf import FPDF

from tests import samples

RESEND_SHARE = 0.2
SENDER = "Printout Designer <invoices@shop.example>"
FIRST_DATE = datetime(2024, 1, 2, 8, 0, tzinfo=UTC)


def invoice_mails(count: int, *, seed: int = 7) -> list[bytes]:
    """`count` mails, each with one invoice PDF (about 27 KB, with a logo image).

    A fifth are byte-identical resends of an earlier mail's PDF (a new mail, a new
    Message-ID, the same file), as when an automation rule fires twice.
    """
    draw = random.Random(seed)
    originals: list[tuple[str, bytes]] = []
    mails: list[bytes] = []
    for index in range(count):
        date = FIRST_DATE + timedelta(minutes=17 * index)
        if originals and draw.random() < RESEND_SHARE:
            number, pdf = draw.choice(originals)
        else:
            number = str(10_000 + len(originals))
            pdf = samples.invoice_pdf(
                number=number, amount=f"{draw.randint(5, 900)}.{draw.randint(0, 99):02d}"
            )
            originals.append((number, pdf))
        mails.append(
            samples.invoice_mail(
                pdfs=[(f"Invoice-{number}.pdf", pdf)],
                sender=SENDER,
                subject=f"Your invoice {number}",
                message_id=f"<bench-{index}.{number}@shop.example>",
                date=date,
            )
        )
    return mails


def distinct_pdfs(mails: list[bytes]) -> int:
    """How many different PDFs `invoice_mails` put into `mails` (what should be forwarded)."""
    return len({_pdf_part(mail) for mail in mails})


def _pdf_part(mail: bytes) -> bytes:
    return mail.rpartition(b'filename="')[2]


def large_pdf(size: int, *, seed: int = 11) -> bytes:
    """An invoice page that draws one big image of noise: a valid PDF of about `size` bytes."""
    side = int((size / 3) ** 0.5)
    pixels = random.Random(seed).randbytes(side * side * 3)
    image = _ppm(side, pixels)
    pdf = FPDF(format="A4")
    pdf.set_compression(False)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, "Invoice No. 99001")
    pdf.image(io.BytesIO(image), x=15, y=30, w=180, h=180)
    return bytes(pdf.output())


def _ppm(side: int, pixels: bytes) -> bytes:
    return f"P6 {side} {side} 255\n".encode() + pixels


def large_attachment_mail(size: int) -> bytes:
    pdf = large_pdf(size)
    return samples.invoice_mail(
        pdfs=[("Invoice-99001.pdf", pdf)],
        sender=SENDER,
        subject="Your invoice 99001 (with the full catalogue)",
        message_id="<bench-large@shop.example>",
    )


def distinct_invoice_mails(count: int, *, first: int = 50_000) -> list[bytes]:
    """`count` mails, each with an invoice no other mail carries (all are forwarded)."""
    return [
        samples.invoice_mail(
            pdfs=[(f"Invoice-{number}.pdf", samples.invoice_pdf(number=str(number)))],
            sender=SENDER,
            subject=f"Your invoice {number}",
            message_id=f"<bench-live-{number}@shop.example>",
        )
        for number in range(first, first + count)
    ]
