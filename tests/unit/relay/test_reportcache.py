"""Byte-identical PDFs are checked once; failed checks are tried again."""

from __future__ import annotations

from collections.abc import Iterable

from tests.fakes import FakeInspector
from worker.errors import PdfCheckFailed
from worker.models import PdfReport
from worker.relay.reportcache import ReportCache

PDF_A = b"%PDF-1.4\nA\n%%EOF\n"
PDF_B = b"%PDF-1.4\nB\n%%EOF\n"


class CountingInspector(FakeInspector):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[bytes]] = []

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        batch = list(files)
        self.calls.append(batch)
        return super().inspect_many(batch)


def test_identical_files_are_checked_once_within_and_across_calls() -> None:
    inspector = CountingInspector()
    cache = ReportCache(inspector)

    first = cache.check({1: PDF_A, 2: PDF_B, 3: PDF_A})
    second = cache.check({4: PDF_B, 5: PDF_A})

    assert inspector.calls == [[PDF_A, PDF_B], []]
    assert first[1] == first[3] == second[5]
    assert first[2] == second[4]
    assert isinstance(first[1], PdfReport)
    assert first[1].accepted
    assert first[1] != first[2]


def test_a_failed_check_is_not_kept() -> None:
    inspector = CountingInspector()
    inspector.crash_on.add(PDF_A)
    cache = ReportCache(inspector)

    assert isinstance(cache.check({1: PDF_A})[1], PdfCheckFailed)
    inspector.crash_on.clear()
    again = cache.check({2: PDF_A})

    assert isinstance(again[2], PdfReport)
    assert inspector.calls == [[PDF_A], [PDF_A]]


def test_the_least_recently_used_report_leaves_first() -> None:
    inspector = CountingInspector()
    cache = ReportCache(inspector, size=2)
    pdf_c = b"%PDF-1.4\nC\n%%EOF\n"
    cache.check({1: PDF_A})
    cache.check({2: PDF_B})
    cache.check({3: PDF_A})  # A used again: B is now the oldest
    cache.check({4: pdf_c})  # over the bound: B leaves

    cache.check({5: PDF_A, 6: PDF_B})

    assert inspector.calls[-1] == [PDF_B]
