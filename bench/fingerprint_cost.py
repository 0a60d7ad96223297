"""What the content fingerprint costs per PDF: inspection with it against validation alone.

Builds 200 distinct invoices of about 30 KB (half by fpdf2, half by reportlab, each with
a logo), then times `inspect_pdf` in this process and through a warm `PdfInspector`
pool, with `fingerprint=True` and `fingerprint=False`. Both modes read the invoice
number; the difference is the fingerprint alone.

    .venv/bin/python bench/fingerprint_cost.py [--files 200] [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import samples
from tests.unit.pdf.test_fingerprint import reportlab_invoice
from worker.pdf.inspection import inspect_pdf
from worker.pdf.pool import PdfInspector


def invoices(count: int) -> list[bytes]:
    files = []
    for index in range(count):
        number = str(10_000 + index)
        amount = f"{50 + index * 1.37:.2f}"
        lines = [
            (f"{item} (order {number}, line {line})", f"{(index + line) % 90 + 5}.00")
            for line, item in enumerate(("Merino wool jumper", "Leather belt", "Socks, 3 pairs"))
        ]
        build = samples.invoice_pdf if index % 2 == 0 else reportlab_invoice
        files.append(build(number=number, amount=amount, lines=lines))
    return files


def interleaved(
    rounds: int, alone: Callable[[], object], full: Callable[[], object]
) -> tuple[float, float]:
    """Best wall time of each, the two alternating so that a busy machine hurts both alike."""
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for fingerprint, run in ((False, alone), (True, full)):
            started = time.perf_counter()
            run()
            timings[fingerprint].append(time.perf_counter() - started)
    return min(timings[False]), min(timings[True])


def in_process(files: Sequence[bytes], *, rounds: int) -> tuple[float, float]:
    def runner(fingerprint: bool) -> Callable[[], None]:
        def run() -> None:
            for data in files:
                report = inspect_pdf(data, fingerprint=fingerprint)
                assert report.accepted and (report.fingerprint is not None) is fingerprint

        return run

    return interleaved(rounds, runner(False), runner(True))


def pooled(files: Sequence[bytes], *, rounds: int, workers: int) -> tuple[float, float]:
    # Workers are not recycled during the measurement (max_tasks_per_worker).
    budget = len(files) * (rounds + 1)
    with (
        PdfInspector(workers=workers, fingerprint=False, max_tasks_per_worker=budget) as alone,
        PdfInspector(workers=workers, fingerprint=True, max_tasks_per_worker=budget) as full,
    ):

        def runner(inspector: PdfInspector) -> Callable[[], None]:
            def run() -> None:
                results = inspector.inspect_many(files)
                assert all(not isinstance(result, Exception) for result in results)

            return run

        for inspector in (alone, full):
            inspector.inspect_many(files[: workers * 2])  # start the workers: the pool is warm
        return interleaved(rounds, runner(alone), runner(full))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    files = invoices(args.files)
    sizes = [len(data) for data in files]
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"{len(files)} invoices, {statistics.mean(sizes) / 1024:.1f} KB on average "
        f"({min(sizes) / 1024:.1f}-{max(sizes) / 1024:.1f} KB); best of {args.rounds} rounds"
    )
    print(f"{'where':<26} {'validation only':>16} {'with fingerprint':>17} {'ratio':>6}")
    for where, (alone, full) in (
        ("in process", in_process(files, rounds=args.rounds)),
        (
            f"warm pool, {args.workers} workers",
            pooled(files, rounds=args.rounds, workers=args.workers),
        ),
    ):
        per_alone, per_full = alone / len(files) * 1000, full / len(files) * 1000
        print(
            f"{where:<26} {per_alone:>13.2f} ms {per_full:>14.2f} ms {full / alone:>6.2f}"
            f"   ({per_full - per_alone:+.2f} ms per PDF)"
        )


if __name__ == "__main__":
    main()
