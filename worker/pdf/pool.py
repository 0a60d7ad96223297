"""The pool of guarded worker processes that run `worker.pdf.inspection.inspect_pdf`.

Workers are forked from a forkserver (never from the parent itself), live under an
address-space limit and get a wall-clock timeout per file, so a hostile PDF can neither
hang nor crash a poll. They start on first use and are reused between polls.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Final, Literal, Self

from worker.errors import PdfCheckFailed
from worker.models import DEFAULT_PDF_MEMORY_MB, DEFAULT_PDF_TIMEOUT_SECONDS, MB, PdfReport

logger = logging.getLogger(__name__)

# The share of the per-file timeout the fingerprint may use; past it the file is still
# validated and the fingerprint falls back to the bytes hash (see `inspect_pdf`).
FINGERPRINT_SHARE: Final = 0.5

# What the fork server imports once, so that workers forked from it start in
# milliseconds. multiprocessing skips a name that does not import without a word (every
# worker then imports pypdf itself): tests/unit/pdf/test_inspection.py imports each.
FORKSERVER_PRELOAD: Final = ("worker.pdf.inspection", "worker.pdf.pool")

Check = Callable[[bytes], PdfReport]
_Reply = tuple[Literal["ok"], PdfReport] | tuple[Literal["error", "fatal"], str]


@dataclass(frozen=True, slots=True, kw_only=True)
class _InspectPdf:
    """The default check, `worker.pdf.inspection.inspect_pdf`. Imported in the workers only (the
    forkserver preloads it): the poll's own process never needs pypdf."""

    invoice_pattern: re.Pattern[str] | None
    fingerprint: bool
    fingerprint_budget_seconds: float
    credit_note_pattern: re.Pattern[str] | None = None

    def __call__(self, data: bytes) -> PdfReport:
        from worker.pdf.inspection import inspect_pdf  # here, not at the top: see the docstring

        return inspect_pdf(
            data,
            invoice_pattern=self.invoice_pattern,
            fingerprint=self.fingerprint,
            fingerprint_budget_seconds=self.fingerprint_budget_seconds,
            credit_note_pattern=self.credit_note_pattern,
        )


def _child_main(connection: Connection, check: Check, memory_limit_bytes: int | None) -> None:
    """A worker process: answers one file after another until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if memory_limit_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    while True:
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        reply: _Reply
        try:
            reply = ("ok", check(data))
        except MemoryError:
            reply = ("fatal", "ran out of memory")
        except Exception as exc:  # noqa: BLE001 - the parent turns it into PdfCheckFailed
            reply = ("error", f"check raised {type(exc).__name__}: {exc}")
        try:
            connection.send(reply)
        except (OSError, MemoryError):
            return
        if reply[0] == "fatal":
            return


@dataclass(slots=True, kw_only=True)
class _Worker:
    process: BaseProcess
    connection: Connection
    tasks: int = 0


@dataclass(slots=True, kw_only=True)
class _Task:
    index: int
    data: bytes
    tries: int = 0


class PdfInspector:
    """Runs `inspect_pdf` (or `check`) in worker processes; see `worker.relay.ports.Inspector`.

    Workers start on first use and are reused; a worker that times out is killed and one
    that crashes is replaced, and only that file gets a `PdfCheckFailed`. The default
    check gives the fingerprint half of `timeout_seconds`, so a file that is merely slow
    to fingerprint is still accepted, keyed by its bytes hash alone, before the timeout
    turns it into an error. `fingerprint=False` skips the fingerprint (for measuring).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        timeout_seconds: float = DEFAULT_PDF_TIMEOUT_SECONDS,
        memory_limit_bytes: int | None = DEFAULT_PDF_MEMORY_MB * MB,
        max_tasks_per_worker: int = 200,
        invoice_pattern: str | None = None,
        fingerprint: bool = True,
        check: Check | None = None,  # None: `worker.pdf.inspection.inspect_pdf`
        credit_note_pattern: str | None = None,  # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN
    ) -> None:
        if workers < 1 or timeout_seconds <= 0 or max_tasks_per_worker < 1:
            raise ValueError("workers, timeout_seconds and max_tasks_per_worker must be positive")
        compiled: re.Pattern[str] | None = None
        if invoice_pattern is not None:
            try:
                compiled = re.compile(invoice_pattern)
            except re.error as exc:
                raise ValueError(f"invalid invoice number pattern: {exc}") from exc
            if check is not None:
                raise ValueError("invoice_pattern applies to the default check only")
        self._check: Check = check or _InspectPdf(
            invoice_pattern=compiled,
            fingerprint=fingerprint,
            fingerprint_budget_seconds=timeout_seconds * FINGERPRINT_SHARE,
            credit_note_pattern=re.compile(credit_note_pattern) if credit_note_pattern else None,
        )
        self._size = workers
        self._timeout = timeout_seconds
        self._memory_limit = memory_limit_bytes
        self._max_tasks = max_tasks_per_worker
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        self._idle: list[_Worker] = []
        self._closed = False
        self._warming: threading.Thread | None = None
        self._warmed: list[_Worker] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def prestart(self) -> None:
        """Start the worker processes now, in a thread, so that their start-up (the
        forkserver's, the first time) overlaps the poll's IMAP work instead of delaying
        the first batch's checks. Does nothing when workers are running already."""
        if self._closed or self._warming is not None or self._idle:
            return
        self._warming = threading.Thread(
            target=self._warm, name="invoice-relay-pdf-start", daemon=True
        )
        self._warming.start()

    def _warm(self) -> None:
        try:
            for _ in range(self._size):
                self._warmed.append(self._start())
        except OSError:  # no worker now: inspect_many starts (and reports) them itself
            logger.debug("could not start PDF workers ahead", exc_info=True)

    def _join_warm(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None
            self._idle.extend(self._warmed)
            self._warmed = []

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        if self._closed:
            raise RuntimeError("PdfInspector is closed")
        self._join_warm()
        queue = deque(_Task(index=index, data=data) for index, data in enumerate(files))
        results: list[PdfReport | Exception | None] = [None] * len(queue)
        busy: dict[Connection, tuple[_Worker, _Task, float]] = {}
        try:
            while queue or busy:
                while queue and len(busy) < self._size:
                    task = queue.popleft()
                    worker = self._dispatch(task)
                    if worker is None:
                        if task.tries < 2:
                            queue.appendleft(task)
                        else:
                            results[task.index] = PdfCheckFailed("could not start a worker")
                        continue
                    busy[worker.connection] = (worker, task, time.monotonic() + self._timeout)
                if busy:
                    for index, outcome in self._collect(busy):
                        results[index] = outcome
        finally:
            for worker, _, _ in busy.values():
                self._discard(worker, kill=True)
        return [result if result is not None else PdfCheckFailed("no result") for result in results]

    def close(self) -> None:
        """Stop every worker process; the inspector cannot be used afterwards."""
        self._join_warm()
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.connection.close()  # the child sees EOF and exits
        for worker in idle:
            self._reap(worker, grace=2.0)

    def _dispatch(self, task: _Task) -> _Worker | None:
        task.tries += 1
        worker = self._idle.pop() if self._idle else self._start()
        if not worker.process.is_alive():
            self._discard(worker, kill=True)
            return None
        try:
            worker.connection.send_bytes(task.data)
        except OSError:
            self._discard(worker, kill=True)
            return None
        worker.tasks += 1
        return worker

    def _collect(
        self, busy: dict[Connection, tuple[_Worker, _Task, float]]
    ) -> Iterator[tuple[int, PdfReport | Exception]]:
        first_deadline = min(deadline for _, _, deadline in busy.values())
        ready = wait(list(busy), timeout=max(0.0, first_deadline - time.monotonic()))
        for connection in ready:
            assert isinstance(connection, Connection)
            worker, task, _ = busy.pop(connection)
            yield task.index, self._receive(worker)
        now = time.monotonic()
        for connection, (worker, task, deadline) in list(busy.items()):
            if deadline <= now:
                del busy[connection]
                self._discard(worker, kill=True)
                logger.warning(
                    "PDF check timed out",
                    extra={"action": "pdf_check_timeout", "size": len(task.data)},
                )
                yield task.index, PdfCheckFailed(f"timed out after {self._timeout:g}s")

    def _receive(self, worker: _Worker) -> PdfReport | Exception:
        try:
            reply: _Reply = worker.connection.recv()
        except (EOFError, OSError):
            code = self._discard(worker, kill=True)
            detail = (
                f"killed by signal {-code}"
                if code is not None and code < 0
                else f"exit code {code}"
            )
            logger.warning("PDF check crashed: %s", detail, extra={"action": "pdf_check_crashed"})
            return PdfCheckFailed(f"worker crashed ({detail})")
        kind, payload = reply
        if kind == "ok":
            assert isinstance(payload, PdfReport)
            result: PdfReport | Exception = payload
        else:
            result = PdfCheckFailed(str(payload))
        if kind == "fatal" or worker.tasks >= self._max_tasks or self._closed:
            worker.connection.close()
            self._reap(worker, grace=2.0)
        else:
            self._idle.append(worker)
        return result

    def _start(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child_end, self._check, self._memory_limit),
            name="invoice-relay-pdf",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()
        return _Worker(process=process, connection=parent_end)

    def _discard(self, worker: _Worker, *, kill: bool) -> int | None:
        """Stop a worker that is no longer trusted; returns its exit code."""
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.connection.close()
        return self._reap(worker, grace=None)

    @staticmethod
    def _reap(worker: _Worker, *, grace: float | None) -> int | None:
        worker.process.join(grace)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        code = worker.process.exitcode
        worker.process.close()
        return code
