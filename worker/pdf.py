"""Validation and content fingerprint of one PDF, run in guarded child processes.

`inspect_pdf` is pure and decides everything about one file. `PdfInspector` runs it in
a small pool of worker processes (forkserver, never fork) with an address-space limit
and a wall-clock timeout per file, so a hostile PDF can neither hang nor crash a poll.

A PDF is accepted when it
- starts with `%PDF-` (after optional whitespace) and ends with `%%EOF` within its last
  1024 bytes (where readers look for it; a file without it was cut short),
- opens with pypdf, has a catalog and at least one page,
- and every page's content stream, and every image or form the page draws, decodes
  (a compressed stream that zlib reports as corrupt counts as not decoding).
The fingerprint `fp1:<sha256>` covers what determines each page's appearance: page
size and rotation, the content stream re-serialised in pypdf's canonical form (so
whitespace, number formatting and compression do not matter), the fonts' names, and
the decoded data of each XObject the page uses. Metadata, XMP, /ID, dates, producer
and object numbers are left out, so re-renders and re-saves of one invoice match.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import multiprocessing
import re
import resource
import signal
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Final, Literal, Self

from pypdf import PasswordType, PdfReader, apply_configuration
from pypdf.errors import DependencyError, PyPdfError
from pypdf.generic import (
    ArrayObject,
    ContentStream,
    DecodedStreamObject,
    DictionaryObject,
    NameObject,
    NullObject,
    PdfObject,
    StreamObject,
)

from worker.errors import PdfCheckFailed
from worker.models import PdfReport

logger = logging.getLogger(__name__)

FINGERPRINT_PREFIX: Final = "fp1:"

# "Invoice No. 1042", "Rechnung Nr. 2024-17", "Facture N° F-88", "Factura nº 12",
# "Fattura n. 7", "Factuur nr 55", "Invoice number: INV-1042", "Invoice #1042".
DEFAULT_INVOICE_NUMBER_PATTERN: Final = (
    r"(?i)\b(?:invoice|rechnung|facture|factura|fattura|factuur)"
    r"(?:s?nummer|s?nr\.?)?"
    r"[ \t]*(?:number|num[eé]ro|n[uú]mero|nummer|no\.?|nr\.?|n[°º]|n\.|#)?"
    r"[ \t]*[:#]?[ \t]*"
    r"(?P<number>(?=[A-Z0-9./-]*\d)[A-Z0-9](?:[A-Z0-9./-]*[A-Z0-9])?)"
)

_MIB: Final = 1 << 20
# pypdf's own decoding limits, lowered from its defaults (75 MB) for invoices.
_PYPDF_LIMITS: Final[dict[str, Any]] = {
    "jbig2dec_binary": None,  # never run the external jbig2dec program on mail input
    "disable_legacy_handling": True,
    "maximum_declared_stream_length": 32 * _MIB,
    "zlib_maximum_output_length": 64 * _MIB,
    "lzw_maximum_output_length": 64 * _MIB,
    "run_length_maximum_output_length": 64 * _MIB,
    "brotli_maximum_output_length": 64 * _MIB,
    "array_based_stream_maximum_output_length": 64 * _MIB,
    "image_maximum_buffer_size": 64 * _MIB,
}
_EOF_WINDOW: Final = 1024
_TEXT_PAGES: Final = 2
_TEXT_LIMIT: Final = 20_000
_MAX_XOBJECT_DEPTH: Final = 8
_MAX_XOBJECTS: Final = 1_000
_SUBSET_TAG = re.compile(r"^[A-Z]{6}\+")
_READ_ERRORS: Final = (PyPdfError, ValueError, KeyError, TypeError, AttributeError, zlib.error)


class _Unparseable(Exception):
    """The file is damaged: the reason becomes the report's."""


def inspect_pdf(data: bytes, *, invoice_pattern: re.Pattern[str] | None = None) -> PdfReport:
    """Decide whether `data` is an accepted PDF; fingerprint it and read its invoice number."""
    head = data[:1024].lstrip()
    if not head.startswith(b"%PDF-"):
        return PdfReport(accepted=False, reason=f"not a PDF ({_describe_start(data, head)})")
    with apply_configuration(**_PYPDF_LIMITS):
        try:
            return _inspect(data, invoice_pattern or _default_pattern())
        except _Unparseable as exc:
            return PdfReport(accepted=False, reason=f"unparseable PDF: {exc}")
        except RecursionError:
            return PdfReport(accepted=False, reason="unparseable PDF: nested too deeply")
        except _READ_ERRORS as exc:
            return PdfReport(accepted=False, reason=f"unparseable PDF: {_short(exc)}")


@functools.cache
def _default_pattern() -> re.Pattern[str]:
    return re.compile(DEFAULT_INVOICE_NUMBER_PATTERN)


def _describe_start(data: bytes, head: bytes) -> str:
    if not head:
        return "only whitespace" if data else "empty"
    return f"starts with {head[:8]!r}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _inspect(data: bytes, pattern: re.Pattern[str]) -> PdfReport:
    if b"%%EOF" not in data[-_EOF_WINDOW:]:
        raise _Unparseable("no %%EOF marker at the end (truncated?)")
    reader = PdfReader(io.BytesIO(data), strict=False)
    encrypted = reader.is_encrypted
    if encrypted:
        try:
            opened = reader.decrypt("") != PasswordType.NOT_DECRYPTED
        except (*_READ_ERRORS, DependencyError, NotImplementedError):
            opened = False
        if not opened:
            return PdfReport(
                accepted=True,
                encrypted=True,
                fingerprint=None,
                fingerprint_note="encrypted: fingerprint unavailable",
            )
    if not isinstance(reader.trailer.get("/Root", NullObject()).get_object(), DictionaryObject):
        raise _Unparseable("no document catalog")
    page_count = len(reader.pages)
    if page_count == 0:
        raise _Unparseable("no pages")
    fingerprint = _Fingerprint(reader)
    note: str | None = None
    for number, page in enumerate(reader.pages, start=1):
        try:
            fingerprint.add_page(page, number)
        except _Unparseable:
            raise
        except _READ_ERRORS as exc:
            raise _Unparseable(f"page {number}: {_short(exc)}") from exc
        except (DependencyError, NotImplementedError, RecursionError) as exc:
            note = f"fingerprint unavailable: page {number}: {_short(exc)}"
    return PdfReport(
        accepted=True,
        encrypted=encrypted,
        pages=page_count,
        fingerprint=None if note else fingerprint.hexdigest(),
        fingerprint_note=note,
        invoice_number=_invoice_number(reader, pattern),
    )


class _Fingerprint:
    """Feeds what determines the pages' appearance into one SHA-256, page after page."""

    def __init__(self, reader: PdfReader) -> None:
        self.reader = reader
        self.digest = hashlib.sha256()
        self.budget = _MAX_XOBJECTS

    def hexdigest(self) -> str:
        return FINGERPRINT_PREFIX + self.digest.hexdigest()

    def add_page(self, page: DictionaryObject, number: int) -> None:
        self.digest.update(b"page %d\n" % number)
        box = page.get("/MediaBox")
        if isinstance(box, ArrayObject):
            self.digest.update(repr([round(float(value), 2) for value in box]).encode())
        self.digest.update(b" rotate %d\n" % int(page.get("/Rotate", 0)))
        self._add_content(
            data=_page_contents(page, number),
            resources=_dictionary(page, "/Resources", f"page {number} resources"),
            where=f"page {number}",
            depth=0,
        )

    def _add_content(
        self, *, data: bytes, resources: DictionaryObject, where: str, depth: int
    ) -> None:
        self.digest.update(_canonical_operations(self.reader, data, where))
        fonts = _dictionary(resources, "/Font", f"{where} fonts")
        for name in sorted(fonts):
            font = _dictionary(fonts, name, f"{where} font {name}")
            base = _SUBSET_TAG.sub("", str(font.get("/BaseFont", "")).lstrip("/"))
            encoding = font.get("/Encoding")
            encoding_name = encoding if isinstance(encoding, NameObject) else ""
            self.digest.update(
                f"font {name} {font.get('/Subtype', '')} {base} {encoding_name}\n".encode()
            )
        xobjects = _dictionary(resources, "/XObject", f"{where} XObjects")
        for name in sorted(xobjects):
            self.budget -= 1
            if self.budget < 0 or depth >= _MAX_XOBJECT_DEPTH:
                raise RecursionError(f"{where}: too many or too deeply nested XObjects")
            what = f"{where} XObject {name}"
            self._add_xobject(xobject=_lookup(xobjects, name, what), what=what, depth=depth)

    def _add_xobject(self, *, xobject: PdfObject | None, what: str, depth: int) -> None:
        if not isinstance(xobject, StreamObject):
            raise _Unparseable(f"{what} is missing")
        subtype = xobject.get("/Subtype")
        self.digest.update(f"xobject {what} {subtype}\n".encode())
        if subtype == "/Form":
            self._add_content(
                data=_decoded(xobject, what),
                resources=_dictionary(xobject, "/Resources", f"{what} resources"),
                where=what,
                depth=depth + 1,
            )
            return
        for key in ("/Width", "/Height", "/BitsPerComponent", "/ImageMask"):
            self.digest.update(f"{key}={xobject.get(key)}\n".encode())
        self.digest.update(_image_bytes(xobject, what))
        mask = _lookup(xobject, "/SMask", f"{what} /SMask")
        if mask is not None:
            self.digest.update(b"smask\n" + _image_bytes(mask, f"{what} /SMask"))


def _page_contents(page: DictionaryObject, number: int) -> bytes:
    contents = _lookup(page, "/Contents", f"page {number} content")
    if contents is None:
        return b""  # a blank page
    if isinstance(contents, ArrayObject):
        return b"\n".join(
            _decoded(item.get_object(), f"page {number} content") for item in contents
        )
    return _decoded(contents, f"page {number} content")


def _lookup(container: DictionaryObject, key: str, what: str) -> PdfObject | None:
    """The object under `key`, resolved; None when absent, but a dangling reference is damage."""
    if key not in container:
        return None
    resolved: PdfObject | None = container.raw_get(key).get_object()
    if resolved is None or isinstance(resolved, NullObject):
        raise _Unparseable(f"{what} is missing")
    return resolved


def _dictionary(container: DictionaryObject, key: str, what: str) -> DictionaryObject:
    resolved = _lookup(container, key, what)
    if resolved is None:
        return DictionaryObject()
    if not isinstance(resolved, DictionaryObject):
        raise _Unparseable(f"{what} is not a dictionary")
    return resolved


def _decoded(stream: PdfObject | None, what: str) -> bytes:
    """The stream's decoded bytes; raises `_Unparseable` when the stream is damaged."""
    if not isinstance(stream, StreamObject):
        raise _Unparseable(f"{what} is missing")
    filters = stream.get("/Filter")
    first = filters[0] if isinstance(filters, ArrayObject) and filters else filters
    if first in ("/FlateDecode", "/Fl"):
        _check_flate(getattr(stream, "_data", b""), what)
    try:
        return stream.get_data()
    except (DependencyError, NotImplementedError):
        raise
    except _READ_ERRORS as exc:
        raise _Unparseable(f"{what}: {_short(exc)}") from exc


def _check_flate(raw: bytes, what: str) -> None:
    """pypdf silently recovers what it can from a corrupt zlib stream; we want to know."""
    limit: int = _PYPDF_LIMITS["zlib_maximum_output_length"]
    try:
        zlib.decompressobj().decompress(raw, limit)
    except zlib.error as exc:
        if "header" not in str(exc):
            raise _Unparseable(f"{what}: corrupt compressed data ({exc})") from exc
        try:  # some writers omit the zlib header: raw deflate data
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, limit)
        except zlib.error as raw_exc:
            raise _Unparseable(f"{what}: corrupt compressed data ({raw_exc})") from raw_exc


def _image_bytes(image: PdfObject | None, what: str) -> bytes:
    try:
        return _decoded(image, what)
    except (DependencyError, NotImplementedError):
        # A filter pypdf cannot (or may not) decode, such as JBIG2: the encoded bytes
        # still identify the image as long as nobody re-encodes it.
        return bytes(getattr(image, "_data", b""))


def _canonical_operations(reader: PdfReader, data: bytes, where: str) -> bytes:
    """The content stream written back in one canonical form, whatever wrote it first."""
    stream = DecodedStreamObject()
    stream.set_data(data)
    try:
        operations = ContentStream(stream, reader).operations
    except _READ_ERRORS as exc:
        raise _Unparseable(f"{where}: content stream: {_short(exc)}") from exc
    out = io.BytesIO()
    for operands, operator in operations:
        if operator == b"INLINE IMAGE":
            operands["settings"].write_to_stream(out)
            out.write(b" ID ")
            out.write(operands["data"])
            out.write(b" EI\n")
            continue
        for operand in operands:
            operand.write_to_stream(out)
            out.write(b" ")
        out.write(operator)
        out.write(b"\n")
    return out.getvalue()


def _invoice_number(reader: PdfReader, pattern: re.Pattern[str]) -> str | None:
    text = ""
    try:
        for page in reader.pages[:_TEXT_PAGES]:
            text += page.extract_text() + "\n"
            if len(text) >= _TEXT_LIMIT:
                break
    except (*_READ_ERRORS, DependencyError, NotImplementedError, RecursionError):
        logger.debug("text extraction failed", exc_info=True)
    match = pattern.search(text[:_TEXT_LIMIT])
    if match is None:
        return None
    if "number" in pattern.groupindex:
        number = match.group("number")
    else:
        number = match.group(1) if pattern.groups else match.group(0)
    return number.strip() or None if number else None


# --- the pool of guarded child processes -----------------------------------------------

Check = Callable[[bytes], PdfReport]
_Reply = tuple[Literal["ok"], PdfReport] | tuple[Literal["error", "fatal"], str]


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
    """Runs `inspect_pdf` (or `check`) in a pool of worker processes; see `worker.ports.Inspector`.

    Workers start on first use and are reused; a worker that times out is killed and one
    that crashes is replaced, and only that file gets a `PdfCheckFailed`.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        timeout_seconds: float = 30.0,
        memory_limit_bytes: int | None = 1 << 30,
        max_tasks_per_worker: int = 200,
        invoice_pattern: str | None = None,
        check: Check = inspect_pdf,
    ) -> None:
        if workers < 1 or timeout_seconds <= 0 or max_tasks_per_worker < 1:
            raise ValueError("workers, timeout_seconds and max_tasks_per_worker must be positive")
        if invoice_pattern is not None:
            try:
                compiled = re.compile(invoice_pattern)
            except re.error as exc:
                raise ValueError(f"invalid invoice number pattern: {exc}") from exc
            if check is not inspect_pdf:
                raise ValueError("invoice_pattern applies to the default check only")
            check = functools.partial(inspect_pdf, invoice_pattern=compiled)
        self._check = check
        self._size = workers
        self._timeout = timeout_seconds
        self._memory_limit = memory_limit_bytes
        self._max_tasks = max_tasks_per_worker
        self._context = multiprocessing.get_context("forkserver")
        # Workers forked from a server that already imported pypdf start in milliseconds.
        self._context.set_forkserver_preload(["worker.pdf"])
        self._idle: list[_Worker] = []
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        if self._closed:
            raise RuntimeError("PdfInspector is closed")
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
