"""`run` keeps one warm PdfInspector across polls (worker.cli.serve.run_service):
the same worker processes serve one poll after another, and a worker that timed out
is replaced without ending the pool."""

from __future__ import annotations

import os
import threading
import time

from tests.unit.service.test_runner import report, running_service, wait_until
from worker.errors import PdfCheckFailed
from worker.models import PdfReport, PollReport
from worker.pdf.pool import PdfInspector


def pid_or_hang(data: bytes) -> PdfReport:
    """The worker's pid as the invoice number; hangs on a file that says so."""
    if data == b"hang":
        time.sleep(60)
    return PdfReport(accepted=True, invoice_number=str(os.getpid()))


def _pids(results: list[PdfReport | Exception]) -> set[str]:
    return {str(r.invoice_number) for r in results if isinstance(r, PdfReport)}


def test_one_pool_serves_every_poll_and_replaces_a_timed_out_worker() -> None:
    files = [[b"0", b"0"], [b"0", b"0"], [b"hang", b"0"], [b"0", b"0"]]
    seen: list[list[PdfReport | Exception]] = []
    lock = threading.Lock()
    # The timeout leaves a replacement worker room to start on a busy machine.
    with PdfInspector(workers=2, timeout_seconds=3, check=pid_or_hang) as inspector:

        def poll() -> PollReport:
            with lock:
                batch = files[len(seen)]
            results = inspector.inspect_many(batch)
            with lock:
                seen.append(results)
            return report()

        with running_service(poll, interval=3600, http=False) as running:
            for done in range(1, len(files) + 1):
                wait_until(lambda: len(seen) >= done, timeout=30)  # noqa: B023 - used at once
                if done < len(files):
                    running.service.poll_now()

    first, second, hung, after = seen
    assert len(_pids(first)) == 2
    assert _pids(second) == _pids(first)  # the same two processes, not new ones
    assert isinstance(hung[0], PdfCheckFailed)
    assert "timed out" in str(hung[0])
    survivor = _pids(hung)
    assert survivor < _pids(first)
    # The hung worker was killed; a new one stands beside the survivor.
    assert len(_pids(after)) == 2
    assert _pids(after) & _pids(first) == survivor
