"""The content fingerprint against two PDF generators and two rewriting tools.

Each row of MATRIX is a pair built with one generator (fpdf2 or reportlab): the
original invoice and a copy. A re-render (other dates, /ID, producer) or a re-save by
pypdf or by pikepdf/qpdf must keep the fingerprint; a changed amount or line, or
another invoice from the same template, must change it. Pairs never mix generators:
the same invoice from two generators is not expected to match.

`.venv/bin/python -m tests.unit.pdf.test_fingerprint` prints the matrix.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import pikepdf
import pytest
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen.canvas import Canvas

from tests import samples
from worker.cli.wiring import pdf_inspector
from worker.config.settings import Settings
from worker.models import PdfReport
from worker.pdf.inspection import inspect_pdf
from worker.pdf.pool import PdfInspector

# --- the two generators -----------------------------------------------------------------


class Generator(Protocol):
    def __call__(
        self,
        *,
        number: str = "1042",
        amount: str = "99.00",
        lines: Sequence[tuple[str, str]] | None = None,
        rerender: bool = False,
        language: str = "en",
        logo: bool = True,
        text: bool = True,
    ) -> bytes: ...


def fpdf2_invoice(
    *,
    number: str = "1042",
    amount: str = "99.00",
    lines: Sequence[tuple[str, str]] | None = None,
    rerender: bool = False,
    language: str = "en",
    logo: bool = True,
    text: bool = True,
) -> bytes:
    """Printout Designer's look, by fpdf2; a re-render has another date and producer."""
    if not text:
        return samples.textless_pdf()
    return samples.invoice_pdf(
        number=number,
        amount=amount,
        lines=lines,
        language=language,
        logo=logo,
        created=datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC) if rerender else None,
        producer="Printout Designer 2.1 (automation)" if rerender else None,
    )


def reportlab_invoice(
    *,
    number: str = "1042",
    amount: str = "99.00",
    lines: Sequence[tuple[str, str]] | None = None,
    rerender: bool = False,
    language: str = "en",
    logo: bool = True,
    text: bool = True,
) -> bytes:
    """The same invoice laid out with reportlab's canvas.

    The original is rendered in reportlab's invariant mode (fixed date, fixed /ID); a
    re-render is not (today's date, a fresh /ID) and names another producer.
    """
    labels = samples.LABELS[language]
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=0 if rerender else 1)
    canvas.setTitle("Invoice")
    canvas.setCreator("Printout Designer")
    canvas.setProducer("ReportLab re-render" if rerender else "ReportLab")
    if logo:
        canvas.drawImage(ImageReader(io.BytesIO(samples.logo_png())), 42, 740, 68, 68)
    if text:
        canvas.setFont("Helvetica-Bold", 18)
        canvas.drawString(130, 785, "Kestrel & Finch Outfitters")
        canvas.setFont("Helvetica", 10)
        for offset, line in enumerate(
            ("12 Harbour Street", "Bristol BS1 4DJ, United Kingdom", "VAT GB 123 4567 89")
        ):
            canvas.drawString(130, 766 - 14 * offset, line)
        canvas.setFont("Helvetica-Bold", 14)
        canvas.drawString(42, 690, f"{labels['title']} {number}")
        canvas.setFont("Helvetica", 10)
        canvas.drawString(42, 672, f"{labels['date']}: 2024-05-06")
        y = 620
        canvas.setFont("Helvetica-Bold", 10)
        canvas.drawString(42, y, "Item")
        canvas.drawRightString(553, y, "Amount (EUR)")
        canvas.line(42, y - 4, 553, y - 4)
        canvas.setFont("Helvetica", 10)
        for description, price in samples.DEFAULT_LINES if lines is None else lines:
            y -= 20
            canvas.drawString(42, y, description)
            canvas.drawRightString(553, y, price)
        y -= 26
        canvas.line(42, y + 16, 553, y + 16)
        canvas.setFont("Helvetica-Bold", 11)
        canvas.drawString(42, y, labels["total"])
        canvas.drawRightString(553, y, amount)
        canvas.setFont("Helvetica-Oblique", 9)
        canvas.drawString(42, y - 40, labels["thanks"])
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


GENERATORS: dict[str, Generator] = {"fpdf2": fpdf2_invoice, "reportlab": reportlab_invoice}

# --- the rewriting tools ----------------------------------------------------------------


def pypdf_resave(data: bytes) -> bytes:
    """pypdf: objects renumbered, content streams recompressed at level 9, new metadata."""
    return samples.resaved_with_pypdf(data)


def _qpdf(data: bytes, save: Callable[[pikepdf.Pdf, io.BytesIO], None]) -> bytes:
    """pikepdf (qpdf): metadata and XMP renewed, then written by `save`."""
    with pikepdf.open(io.BytesIO(data)) as pdf:
        with pdf.open_metadata(set_pikepdf_as_editor=True) as metadata:
            metadata["dc:title"] = "Invoice (re-saved)"
        pdf.docinfo["/Producer"] = "qpdf re-save"
        out = io.BytesIO()
        save(pdf, out)
        return out.getvalue()


def qpdf_object_streams(data: bytes) -> bytes:
    """Objects packed into object streams, every Flate stream recompressed."""

    def save(pdf: pikepdf.Pdf, out: io.BytesIO) -> None:
        pdf.save(out, object_stream_mode=pikepdf.ObjectStreamMode.generate, recompress_flate=True)

    return _qpdf(data, save)


def qpdf_plain(data: bytes) -> bytes:
    """No object streams, no compression: every stream stored decoded."""

    def save(pdf: pikepdf.Pdf, out: io.BytesIO) -> None:
        pdf.save(
            out,
            object_stream_mode=pikepdf.ObjectStreamMode.disable,
            compress_streams=False,
            stream_decode_level=pikepdf.StreamDecodeLevel.generalized,
        )

    return _qpdf(data, save)


def qpdf_normalised(data: bytes) -> bytes:
    """qpdf's content normalisation: one operator per line, its own number format."""

    def save(pdf: pikepdf.Pdf, out: io.BytesIO) -> None:
        pdf.save(out, normalize_content=True)

    return _qpdf(data, save)


def qpdf_linearized(data: bytes) -> bytes:
    """A linearized ("fast web view") file: objects reordered, hint streams added."""

    def save(pdf: pikepdf.Pdf, out: io.BytesIO) -> None:
        pdf.save(out, linearize=True)

    return _qpdf(data, save)


def qpdf_coalesced(data: bytes) -> bytes:
    """Content streams merged into one per page, as qpdf --coalesce-contents does."""

    def save(pdf: pikepdf.Pdf, out: io.BytesIO) -> None:
        for page in pdf.pages:
            page.contents_coalesce()
        pdf.save(out)

    return _qpdf(data, save)


# --- the matrix -------------------------------------------------------------------------

CHANGED_LINE = [*samples.DEFAULT_LINES[:1], ("Canvas tote bag (red)", "15.00")]
CHANGED_LINE += samples.DEFAULT_LINES[2:]

Build = Callable[[Generator], bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    name: str
    original: Build
    copy: Build
    same: bool  # whether the fingerprints must be equal


def _plain(generator: Generator) -> bytes:
    return generator()


def resaved(name: str, resave: Callable[[bytes], bytes]) -> Pair:
    """The invoice against the same file re-saved by another tool: same fingerprint."""
    return Pair(name=name, original=_plain, copy=lambda g: resave(g()), same=True)


PAIRS: tuple[Pair, ...] = (
    Pair(
        name="re-rendered (date, /ID, producer)",
        original=_plain,
        copy=lambda g: g(rerender=True),
        same=True,
    ),
    resaved("re-saved by pypdf", pypdf_resave),
    resaved("qpdf: object streams, recompressed", qpdf_object_streams),
    resaved("qpdf: no object streams, uncompressed", qpdf_plain),
    resaved("qpdf: normalised content", qpdf_normalised),
    resaved("qpdf: linearized", qpdf_linearized),
    resaved("qpdf: content streams coalesced", qpdf_coalesced),
    Pair(
        name="re-rendered, then re-saved by qpdf and pypdf",
        original=lambda g: qpdf_plain(g()),
        copy=lambda g: pypdf_resave(qpdf_object_streams(g(rerender=True))),
        same=True,
    ),
    Pair(
        name="total amount changed", original=_plain, copy=lambda g: g(amount="99.01"), same=False
    ),
    Pair(
        name="one line's text changed",
        original=_plain,
        copy=lambda g: g(lines=CHANGED_LINE),
        same=False,
    ),
    Pair(
        name="one line dropped",
        original=_plain,
        copy=lambda g: g(lines=samples.DEFAULT_LINES[:-1]),
        same=False,
    ),
    Pair(
        name="amount changed, re-rendered and re-saved",
        original=_plain,
        copy=lambda g: qpdf_object_streams(g(amount="99.10", rerender=True)),
        same=False,
    ),
    Pair(
        name="another invoice, same template",
        original=lambda g: g(number="2001", amount="10.00"),
        copy=lambda g: g(number="2002", amount="10.00"),
        same=False,
    ),
    Pair(
        name="another invoice, both re-saved",
        original=lambda g: pypdf_resave(g(number="2001", amount="10.00")),
        copy=lambda g: qpdf_plain(g(number="2002", amount="10.00")),
        same=False,
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PairResult:
    generator: str
    pair: Pair
    bytes_differ: bool
    same_fingerprint: bool

    @property
    def as_expected(self) -> bool:
        return self.bytes_differ and self.same_fingerprint is self.pair.same


def _fingerprint(data: bytes) -> str:
    report = inspect_pdf(data)
    assert report.accepted, report.reason
    assert report.fingerprint is not None, report.fingerprint_note
    return report.fingerprint


def evaluate(generator_name: str, pair: Pair) -> PairResult:
    generator = GENERATORS[generator_name]
    original, copy = pair.original(generator), pair.copy(generator)
    return PairResult(
        generator=generator_name,
        pair=pair,
        bytes_differ=original != copy,
        same_fingerprint=_fingerprint(original) == _fingerprint(copy),
    )


@pytest.mark.parametrize("pair", PAIRS, ids=[pair.name for pair in PAIRS])
@pytest.mark.parametrize("generator_name", sorted(GENERATORS))
def test_fingerprint_matrix(generator_name: str, pair: Pair) -> None:
    outcome = evaluate(generator_name, pair)
    assert outcome.bytes_differ, "the pair must differ in bytes to prove anything"
    assert outcome.same_fingerprint is pair.same


def print_matrix() -> None:
    outcomes = [evaluate(name, pair) for pair in PAIRS for name in sorted(GENERATORS)]
    width = max(len(pair.name) for pair in PAIRS)
    print(f"| {'pair':<{width}} | generator | expected  | fingerprint | ok |")
    print(f"|{'-' * (width + 2)}|-----------|-----------|-------------|----|")
    for outcome in outcomes:
        expected = "same" if outcome.pair.same else "different"
        got = "same" if outcome.same_fingerprint else "different"
        mark = "ok" if outcome.as_expected else "NO"
        print(
            f"| {outcome.pair.name:<{width}} | {outcome.generator:<9} | {expected:<9} "
            f"| {got:<11} | {mark} |"
        )


# --- fallback to the bytes hash ---------------------------------------------------------


def test_generators_fingerprint_differently() -> None:
    # Pairs are within one generator: across generators nothing is promised, and here
    # the layouts differ anyway. This guards against a fingerprint that ignores content.
    assert _fingerprint(fpdf2_invoice()) != _fingerprint(reportlab_invoice())


def test_spent_budget_falls_back_to_bytes_but_still_validates() -> None:
    report = inspect_pdf(reportlab_invoice(), fingerprint_budget_seconds=0)
    assert report.accepted
    assert report.fingerprint is None
    assert report.fingerprint_note == (
        "no content fingerprint (took longer than its time budget): deduplicated by SHA-256 only"
    )
    assert report.invoice_number == "1042"
    damaged = inspect_pdf(samples.corrupt_pdf(), fingerprint_budget_seconds=0)
    assert not damaged.accepted


def test_generous_budget_changes_nothing() -> None:
    data = fpdf2_invoice()
    assert inspect_pdf(data, fingerprint_budget_seconds=60) == inspect_pdf(data)


def _with_garbage(data: bytes, fraction: float) -> bytes:
    damaged = bytearray(data)
    start = int(len(damaged) * fraction)
    damaged[start : start + 64] = bytes(range(100, 164))
    return bytes(damaged)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(samples.invoice_pdf(), id="invoice"),
        pytest.param(reportlab_invoice(), id="reportlab-invoice"),
        pytest.param(samples.textless_pdf(), id="image-only"),
        pytest.param(samples.encrypted_pdf(user_password=""), id="encrypted-empty-pw"),
        pytest.param(samples.encrypted_pdf(), id="encrypted"),
        pytest.param(samples.truncated_pdf(), id="truncated"),
        pytest.param(samples.corrupt_pdf(), id="corrupt"),
        pytest.param(_with_garbage(samples.invoice_pdf(logo=False), 0.2), id="corrupt-content"),
        pytest.param(_with_garbage(samples.invoice_pdf(logo=False), 0.6), id="corrupt-font"),
        pytest.param(_with_garbage(samples.invoice_pdf(), 0.5), id="corrupt-image"),
    ],
)
def test_validation_alone_decides_acceptance_as_with_fingerprint(data: bytes) -> None:
    with_fingerprint = inspect_pdf(data)
    alone = inspect_pdf(data, fingerprint=False)
    assert (alone.accepted, alone.reason) == (with_fingerprint.accepted, with_fingerprint.reason)
    assert alone.fingerprint is None
    if alone.accepted:
        assert alone.invoice_number == with_fingerprint.invoice_number
        assert alone.fingerprint_note is not None


def test_pool_fingerprints_like_in_process_and_can_skip_it() -> None:
    files = [fpdf2_invoice(), reportlab_invoice(), samples.encrypted_pdf()]
    with PdfInspector(workers=2) as inspector:
        pooled = inspector.inspect_many(files)
    with PdfInspector(workers=1, fingerprint=False) as inspector:
        skipped = inspector.inspect_many(files[:1])
    assert pooled == [inspect_pdf(data) for data in files]
    [report] = skipped
    assert isinstance(report, PdfReport)
    assert report.accepted
    assert report.fingerprint is None
    assert report.fingerprint_note is not None
    assert "not computed" in report.fingerprint_note


# --- invoice numbers from both generators -----------------------------------------------

NUMBERS = {"en": "1042", "de": "2024-17", "fr": "F-88", "es": "12", "it": "7", "nl": "INV-55"}


@pytest.mark.parametrize("language", sorted(NUMBERS))
@pytest.mark.parametrize("generator_name", sorted(GENERATORS))
def test_invoice_number_in_six_languages(generator_name: str, language: str) -> None:
    data = GENERATORS[generator_name](language=language, number=NUMBERS[language])
    report = inspect_pdf(data)
    assert report.invoice_number == NUMBERS[language]


@pytest.mark.parametrize("generator_name", sorted(GENERATORS))
def test_pdf_without_text_has_no_number_and_no_error(generator_name: str) -> None:
    report = inspect_pdf(GENERATORS[generator_name](text=False))
    assert report.accepted
    assert report.reason is None
    assert report.invoice_number is None
    assert report.fingerprint is not None


def test_custom_pattern_overrides_the_default() -> None:
    data = reportlab_invoice(number="1042", amount="310.00")
    custom = re.compile(r"Total\s+(?P<number>\d+\.\d\d)")
    assert inspect_pdf(data).invoice_number == "1042"
    assert inspect_pdf(data, invoice_pattern=custom).invoice_number == "310.00"


def test_pattern_setting_reaches_the_workers() -> None:
    environ = {
        "INVOICE_RELAY_IMAP_HOST": "imap.example.com",
        "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
        "INVOICE_RELAY_IMAP_PASSWORD": "secret",
        "INVOICE_RELAY_SMTP_HOST": "smtp.example.com",
        "INVOICE_RELAY_FORWARD_TO": "inbox-123@getmyinvoices.example",
        "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
        "HOME": "/home/relay",
        "INVOICE_RELAY_INVOICE_NUMBER_PATTERN": r"Order ref\.? (?P<number>[A-Z]+-\d+)",
    }
    data = fpdf2_invoice(lines=[("Order ref. SO-3391", "99.00")])
    with pdf_inspector(Settings.from_env(environ)) as inspector:
        [report] = inspector.inspect_many([data])
    assert isinstance(report, PdfReport)
    assert report.invoice_number == "SO-3391"
    assert inspect_pdf(data).invoice_number == "1042"


if __name__ == "__main__":
    print_matrix()
