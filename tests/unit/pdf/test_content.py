"""The shared content-stream parse: the fingerprint and the invoice number read from one
parse must be exactly what they were from two separate parses."""

from __future__ import annotations

import io

import pytest
from pypdf import PdfReader
from pypdf.generic import NameObject

from tests import samples
from tests.unit.pdf.test_fingerprint import reportlab_invoice
from worker.pdf.content import Unparseable, canonical_operations, text_content
from worker.pdf.inspection import inspect_pdf


@pytest.fixture(scope="module")
def reader() -> PdfReader:
    return PdfReader(io.BytesIO(samples.invoice_pdf()))


CONTENT_STREAMS = [
    pytest.param(b"BT /F1 12 Tf 72 700 Td (Invoice No. 1042) Tj ET", id="ascii literal"),
    pytest.param(b"BT (Rechnung \xfc\xe4\xdf) Tj ET", id="pdfdocencoding high bytes"),
    pytest.param(b"BT (\xfe\xff\x00I\x00n\x00v) Tj ET", id="utf-16 bom"),
    pytest.param(b"BT <00410042> Tj <48656c6c6f> Tj ET", id="hex strings, cid-like"),
    pytest.param(b"BT (\x80\x81\x9f\xad) Tj ET", id="bytes pdfdocencoding leaves undefined"),
    pytest.param(b"BT [(Inv) -250 (oice) 120 <0102>] TJ ET", id="TJ array"),
    pytest.param(b"/Span <</ActualText (\xfe\xff\x00A) /Lang (de)>> BDC EMC", id="BDC dict"),
    pytest.param(b"BT (a\\)b\\n\\101) ' 1 2 (c) \" ET", id="escapes and quote operators"),
    pytest.param(b"q BI /W 2 /H 1 /BPC 8 /CS /G ID \x00\xff EI Q", id="inline image"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("data", CONTENT_STREAMS)
def test_a_shared_parse_writes_the_same_canonical_form(reader: PdfReader, data: bytes) -> None:
    own = canonical_operations(reader, data, "page 1")
    shared = canonical_operations(reader, data, "page 1", parsed=text_content(reader, data, "p"))
    assert shared == own


def test_a_damaged_stream_is_reported_by_the_shared_parse_too(reader: PdfReader) -> None:
    with pytest.raises(Unparseable, match="page 1: content stream"):
        text_content(reader, b"BT /F1 12 Tf (never closed", "page 1")


@pytest.mark.parametrize(
    "pdf",
    [
        pytest.param(samples.invoice_pdf(number="2024-17"), id="fpdf2"),
        pytest.param(reportlab_invoice(number="INV-88"), id="reportlab"),
    ],
)
def test_text_read_from_the_shared_parse_is_pypdfs_own(pdf: bytes) -> None:
    fresh = [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]
    reused = PdfReader(io.BytesIO(pdf))
    for page in reused.pages:
        data = page.get_contents()
        assert data is not None
        page[NameObject("/Contents")] = text_content(reused, data.get_data(), "page")
    assert [page.extract_text() for page in reused.pages] == fresh
    assert any("Invoice" in text or "INV" in text for text in fresh)


def test_inspect_pdf_reads_the_number_from_the_shared_parse() -> None:
    report = inspect_pdf(reportlab_invoice(number="INV-88"))
    assert report.accepted
    assert report.invoice_number == "INV-88"
    assert report.fingerprint is not None
