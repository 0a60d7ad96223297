from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import time
from datetime import UTC, datetime

import pytest

from tests import samples
from worker.errors import PdfCheckFailed
from worker.models import PdfReport
from worker.pdf.inspection import (
    DEFAULT_INVOICE_NUMBER_PATTERN,
    INVOICE_NUMBER_MAX_CHARS,
    inspect_pdf,
)
from worker.pdf.pool import FORKSERVER_PRELOAD, PdfInspector

INVOICE = samples.invoice_pdf()


# --- module-level checks the child processes import (the test seam) -------------------


def sleepy_check(data: bytes) -> PdfReport:
    """Hangs on files that say so, else inspects normally."""
    if data.startswith(b"sleep"):
        time.sleep(60)
    return inspect_pdf(data)


def crashing_check(data: bytes) -> PdfReport:
    """Dies without a word on files that say so, else inspects normally."""
    if data.startswith(b"crash"):
        os._exit(3)
    return inspect_pdf(data)


def raising_check(data: bytes) -> PdfReport:
    raise RuntimeError(f"boom on {len(data)} bytes")


def pid_check(data: bytes) -> PdfReport:
    """Reports the worker's pid as the invoice number, after a pause."""
    time.sleep(float(data.decode()))
    return PdfReport(accepted=True, invoice_number=str(os.getpid()))


# --- acceptance -----------------------------------------------------------------------


def _half_with_eof_marker() -> bytes:
    return INVOICE[: len(INVOICE) // 2] + b"\n%%EOF\n"


def _garbage_at(fraction: float, *, logo: bool) -> bytes:
    data = bytearray(samples.invoice_pdf(logo=logo))
    start = int(len(data) * fraction)
    data[start : start + 64] = bytes(range(100, 164))
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "accepted", "encrypted", "reason_start"),
    [
        pytest.param(INVOICE, True, False, None, id="good"),
        pytest.param(b"\r\n  " + INVOICE, True, False, None, id="leading-whitespace"),
        pytest.param(samples.textless_pdf(), True, False, None, id="image-only"),
        pytest.param(samples.truncated_pdf(), False, False, "unparseable PDF", id="truncated-half"),
        pytest.param(
            samples.truncated_pdf(keep=0.99), False, False, "unparseable PDF", id="truncated-tail"
        ),
        pytest.param(_half_with_eof_marker(), False, False, "unparseable PDF", id="half-with-eof"),
        pytest.param(samples.corrupt_pdf(), False, False, "unparseable PDF", id="corrupt"),
        pytest.param(
            _garbage_at(0.2, logo=False), False, False, "unparseable PDF", id="corrupt-content"
        ),
        pytest.param(
            _garbage_at(0.6, logo=False), False, False, "unparseable PDF", id="corrupt-font"
        ),
        pytest.param(b"Dear customer, thank you", False, False, "not a PDF", id="text"),
        pytest.param(b"", False, False, "not a PDF (empty)", id="empty"),
        pytest.param(b" \r\n\t", False, False, "not a PDF (only whitespace)", id="whitespace"),
        pytest.param(b"%PDF-1.4\n%%EOF\n", False, False, "unparseable PDF", id="header-only"),
        pytest.param(samples.encrypted_pdf(), True, True, None, id="encrypted"),
        pytest.param(
            samples.encrypted_pdf(user_password=""), True, True, None, id="encrypted-empty-pw"
        ),
    ],
)
def test_acceptance(data: bytes, accepted: bool, encrypted: bool, reason_start: str | None) -> None:
    report = inspect_pdf(data)
    assert report.accepted is accepted
    assert report.encrypted is encrypted
    if reason_start is None:
        assert report.reason is None
    else:
        assert report.reason is not None
        assert report.reason.startswith(reason_start)
        assert report.fingerprint is None


def test_accepted_invoice_has_pages_fingerprint_and_number() -> None:
    report = inspect_pdf(INVOICE)
    assert report.pages == 1
    assert report.fingerprint is not None
    assert re.fullmatch(r"fp1:[0-9a-f]{64}", report.fingerprint)
    assert report.fingerprint_note is None
    assert report.invoice_number == "1042"


def test_encrypted_without_password_has_no_fingerprint() -> None:
    report = inspect_pdf(samples.encrypted_pdf())
    assert report.fingerprint is None
    assert report.fingerprint_note == (
        "no content fingerprint (encrypted with a password): deduplicated by SHA-256 only"
    )


def test_encrypted_with_empty_password_is_fingerprinted() -> None:
    report = inspect_pdf(samples.encrypted_pdf(user_password=""))
    assert report.fingerprint is not None
    assert report.invoice_number == "7001"


# --- fingerprint ----------------------------------------------------------------------


def _fingerprint(data: bytes) -> str:
    report = inspect_pdf(data)
    assert report.fingerprint is not None, report
    return report.fingerprint


RERENDER = samples.invoice_pdf(
    created=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC), producer="fpdf2 on another day"
)


@pytest.mark.parametrize(
    "copy",
    [
        pytest.param(RERENDER, id="other-date-and-producer"),
        pytest.param(samples.resaved_with_pypdf(INVOICE), id="resaved-with-pypdf"),
        pytest.param(samples.resaved_with_pypdf(RERENDER), id="rerender-resaved"),
    ],
)
def test_same_content_same_fingerprint(copy: bytes) -> None:
    assert copy != INVOICE
    assert _fingerprint(copy) == _fingerprint(INVOICE)


CHANGED_LINES = list(samples.DEFAULT_LINES)
CHANGED_LINES[1] = ("Canvas tote bag (red)", "15.00")


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(samples.invoice_pdf(amount="99.01"), id="total-amount"),
        pytest.param(samples.invoice_pdf(lines=CHANGED_LINES), id="one-line-text"),
        pytest.param(samples.invoice_pdf(lines=samples.DEFAULT_LINES[:-1]), id="line-dropped"),
        pytest.param(samples.invoice_pdf(number="1043"), id="next-invoice-same-template"),
        pytest.param(samples.invoice_pdf(logo=False), id="logo-removed"),
        pytest.param(samples.invoice_pdf(language="de"), id="other-language"),
    ],
)
def test_different_content_different_fingerprint(other: bytes) -> None:
    assert _fingerprint(other) != _fingerprint(INVOICE)


def test_two_invoices_from_one_template_differ_also_after_resave() -> None:
    first = samples.resaved_with_pypdf(samples.invoice_pdf(number="2001", amount="10.00"))
    second = samples.resaved_with_pypdf(samples.invoice_pdf(number="2002", amount="10.00"))
    assert _fingerprint(first) != _fingerprint(second)


# --- invoice number -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "number"),
    [
        ("en", "1042"),
        ("de", "2024-17"),
        ("fr", "F-88"),
        ("es", "12"),
        ("it", "7"),
        ("nl", "55"),
    ],
)
def test_invoice_number_in_six_languages(language: str, number: str) -> None:
    report = inspect_pdf(samples.invoice_pdf(language=language, number=number))
    assert report.invoice_number == number


def test_one_number_read_is_not_ambiguous() -> None:
    report = inspect_pdf(INVOICE)
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", False)


def test_the_same_number_repeated_is_not_ambiguous() -> None:
    # The title, a payment reference and the next page's head all name invoice 1042.
    first = samples.invoice_pdf(
        number="1042", lines=[("Please quote Invoice No. 1042", "")], logo=False
    )
    continued = samples.invoice_pdf(number="1042", lines=[("Shipping", "5.00")], logo=False)
    report = inspect_pdf(samples.joined_pdf(first, continued))
    assert report.pages == 2
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", False)


@pytest.mark.parametrize(
    "document",
    [
        # A credit note naming the invoice it corrects, on its own page.
        samples.invoice_pdf(number="1042", lines=[("Corrects Invoice No. 1041", "-5.00")]),
        # Two invoices sent as one file: the second on page 2.
        samples.joined_pdf(
            samples.invoice_pdf(number="1042", logo=False),
            samples.invoice_pdf(number="1043", logo=False),
        ),
    ],
    ids=["one-page", "second-page"],
)
def test_different_numbers_on_the_first_pages_are_ambiguous(document: bytes) -> None:
    report = inspect_pdf(document)
    assert report.accepted
    # The audit keeps the first as read; the flag says it is not the only one.
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", True)


def test_a_custom_pattern_is_ambiguous_the_same_way() -> None:
    document = samples.invoice_pdf(number="1042", lines=[("Replaces Invoice No. 1041", "")])
    pattern = re.compile(r"Invoice No\. (\d+)")
    report = inspect_pdf(document, invoice_pattern=pattern)
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", True)
    # What the custom pattern does not read does not count.
    narrow = re.compile(r"Invoice No\. (104[2-9])")
    report = inspect_pdf(document, invoice_pattern=narrow)
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", False)


def test_a_number_past_the_first_pages_is_not_read() -> None:
    pages = [samples.invoice_pdf(number="1042", logo=False)] * 2
    document = samples.joined_pdf(*pages, samples.invoice_pdf(number="1099", logo=False))
    report = inspect_pdf(document)
    assert report.pages == 3
    assert (report.invoice_number, report.invoice_number_ambiguous) == ("1042", False)


def test_pdf_without_text_has_no_invoice_number() -> None:
    report = inspect_pdf(samples.textless_pdf())
    assert report.accepted
    assert report.invoice_number is None


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Invoice No. 1042", "1042"),
        ("Invoice #1042", "1042"),
        ("Rechnung Nr. 2024-17", "2024-17"),
        ("Rechnungsnummer: 2024-17.", "2024-17"),
        ("Facture N° F-88", "F-88"),
        ("Factura nº 12", "12"),
        ("Fattura n. 7", "7"),
        ("Factuur nr 55", "55"),
        ("Invoice number: INV-1042", "INV-1042"),
        ("INVOICE NO 77", "77"),
        ("Invoice date: 2024-05-01", None),
        ("Invoices are due in 30 days", None),
        ("Thank you for your order", None),
    ],
)
def test_default_invoice_number_pattern(text: str, number: str | None) -> None:
    match = re.search(DEFAULT_INVOICE_NUMBER_PATTERN, text)
    assert (match.group("number") if match else None) == number


def test_custom_pattern_without_named_group_uses_group_one() -> None:
    report = inspect_pdf(INVOICE, invoice_pattern=re.compile(r"Total\s+([\d.]+)"))
    assert report.invoice_number == "99.00"


def test_what_a_custom_pattern_captures_is_cleaned_and_capped() -> None:
    # A greedy pattern takes the rest of the page's text, line breaks included.
    report = inspect_pdf(INVOICE, invoice_pattern=re.compile(r"(?s)Total(.*)"))
    assert report.invoice_number == "99.00 Thank you!"
    many_lines = samples.invoice_pdf(lines=[(f"Item {n} " + "x" * 40, "1.00") for n in range(9)])
    report = inspect_pdf(many_lines, invoice_pattern=re.compile(r"(?s)(Item.*)"))
    assert report.invoice_number is not None
    assert len(report.invoice_number) == INVOICE_NUMBER_MAX_CHARS


# --- the inspector --------------------------------------------------------------------


def _no_children_left() -> bool:
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_inspector_returns_reports_in_input_order() -> None:
    files = [
        samples.invoice_pdf(number="3001"),
        b"not a pdf",
        samples.invoice_pdf(number="3002"),
        samples.truncated_pdf(),
        samples.invoice_pdf(number="3003"),
    ]
    with PdfInspector(workers=2) as inspector:
        results = inspector.inspect_many(files)
    assert [r.invoice_number if isinstance(r, PdfReport) else r for r in results] == [
        "3001",
        None,
        "3002",
        None,
        "3003",
    ]
    assert [isinstance(r, PdfReport) and r.accepted for r in results] == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert _no_children_left()


def test_inspector_applies_custom_pattern() -> None:
    with PdfInspector(workers=1, invoice_pattern=r"Total\s+(?P<number>[\d.]+)") as inspector:
        [report] = inspector.inspect_many([samples.invoice_pdf(amount="12.34")])
    assert isinstance(report, PdfReport)
    assert report.invoice_number == "12.34"


def test_inspector_runs_files_in_parallel_and_reuses_workers() -> None:
    with PdfInspector(workers=3, check=pid_check) as inspector:
        inspector.inspect_many([b"0"] * 3)  # start all three workers before measuring
        started = time.monotonic()
        results = inspector.inspect_many([b"0.4"] * 3)
        elapsed = time.monotonic() - started
        again = inspector.inspect_many([b"0"] * 6)
    pids = {r.invoice_number for r in results if isinstance(r, PdfReport)}
    assert len(pids) == 3
    assert elapsed < 1.0  # three 0.4 s files one after another would take 1.2 s
    assert {r.invoice_number for r in again if isinstance(r, PdfReport)} <= pids


def test_timeout_yields_failure_and_next_file_still_works() -> None:
    # The timeout counts from dispatch, and the replacement worker must first import this
    # module (about 0.6 s on a busy 2-core machine): leave it room.
    with PdfInspector(workers=1, timeout_seconds=2, check=sleepy_check) as inspector:
        started = time.monotonic()
        results = inspector.inspect_many([b"sleep", INVOICE])
        elapsed = time.monotonic() - started
        later = inspector.inspect_many([INVOICE])
    assert isinstance(results[0], PdfCheckFailed)
    assert "timed out after 2s" in str(results[0])
    assert isinstance(results[1], PdfReport)
    assert results[1].accepted
    assert elapsed < 10
    assert isinstance(later[0], PdfReport)
    assert _no_children_left()


def test_crashing_check_yields_failure_and_pool_recovers() -> None:
    with PdfInspector(workers=2, check=crashing_check) as inspector:
        results = inspector.inspect_many([INVOICE, b"crash", INVOICE, b"crash", INVOICE])
        later = inspector.inspect_many([INVOICE])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["PdfReport", "PdfCheckFailed", "PdfReport", "PdfCheckFailed", "PdfReport"]
    assert "exit code 3" in str(results[1])
    assert isinstance(later[0], PdfReport)
    assert _no_children_left()


def test_check_that_raises_yields_failure() -> None:
    with PdfInspector(workers=1, check=raising_check) as inspector:
        [result] = inspector.inspect_many([b"%PDF-1.4"])
    assert isinstance(result, PdfCheckFailed)
    assert "RuntimeError: boom on 8 bytes" in str(result)


def test_memory_limit_turns_a_huge_allocation_into_a_failure() -> None:
    with PdfInspector(workers=1, memory_limit_bytes=512 << 20, check=greedy_check) as inspector:
        results = inspector.inspect_many([b"greedy", INVOICE])
    assert isinstance(results[0], PdfCheckFailed)
    assert "out of memory" in str(results[0])
    assert isinstance(results[1], PdfReport)


def greedy_check(data: bytes) -> PdfReport:
    if data == b"greedy":
        _ = bytearray(1 << 30)
    return inspect_pdf(data)


def test_workers_are_replaced_after_max_tasks() -> None:
    with PdfInspector(workers=1, max_tasks_per_worker=2, check=pid_check) as inspector:
        results = inspector.inspect_many([b"0"] * 4)
    pids = [r.invoice_number for r in results if isinstance(r, PdfReport)]
    assert pids[0] == pids[1]
    assert pids[1] != pids[2]
    assert pids[2] == pids[3]


def test_close_leaves_no_child_processes_and_refuses_more_work() -> None:
    inspector = PdfInspector(workers=2)
    inspector.inspect_many([INVOICE, INVOICE])
    assert len(multiprocessing.active_children()) == 2
    inspector.close()
    assert _no_children_left()
    with pytest.raises(RuntimeError):
        inspector.inspect_many([INVOICE])


def test_empty_input_starts_no_worker() -> None:
    with PdfInspector() as inspector:
        assert inspector.inspect_many([]) == []
        assert multiprocessing.active_children() == []


def test_invalid_pattern_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="invoice number pattern"):
        PdfInspector(invoice_pattern="(unclosed")


def test_prestart_starts_the_workers_once_and_inspect_many_uses_them() -> None:
    with PdfInspector(workers=2, check=pid_check) as inspector:
        inspector.prestart()
        inspector.prestart()  # a second call while they start adds none
        results = inspector.inspect_many([b"0.2"] * 4)
        assert len(multiprocessing.active_children()) == 2
        inspector.prestart()  # running already: nothing new
        again = inspector.inspect_many([b"0"] * 2)
    pids = {r.invoice_number for r in [*results, *again] if isinstance(r, PdfReport)}
    assert len(pids) == 2
    assert _no_children_left()


def test_close_right_after_prestart_leaves_no_child_processes() -> None:
    inspector = PdfInspector(workers=2)
    inspector.prestart()
    inspector.close()
    assert _no_children_left()
    inspector.prestart()  # closed: does nothing
    assert _no_children_left()


@pytest.mark.parametrize("name", FORKSERVER_PRELOAD)
def test_the_forkserver_preload_names_still_import(name: str) -> None:
    # multiprocessing ignores a preload name that fails to import: a module moved
    # without this list would only make every worker start slowly.
    assert importlib.import_module(name).__name__ == name


def test_the_forkserver_preloads_what_the_workers_run() -> None:
    assert {inspect_pdf.__module__, PdfInspector.__module__} <= set(FORKSERVER_PRELOAD)


def test_a_credit_note_is_read_from_the_first_page() -> None:
    # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN on the bounded first-page text only.
    from worker.models import DEFAULT_GMI_CREDIT_NOTE_PATTERN

    pattern = re.compile(DEFAULT_GMI_CREDIT_NOTE_PATTERN)
    credit = samples.invoice_pdf(
        number="17", lines=[("Gutschrift zu Rechnung 16", "-10.00")], logo=False
    )
    invoice = samples.invoice_pdf(number="18", logo=False)
    assert inspect_pdf(credit, credit_note_pattern=pattern).credit_note
    assert not inspect_pdf(invoice, credit_note_pattern=pattern).credit_note
    assert not inspect_pdf(credit).credit_note  # not asked: not read
