"""PDF reports kept by SHA-256, so a byte-identical resend is not checked again.

The check (`worker.pdf.inspection.inspect_pdf`) is a function of the file's bytes: a report made
once for a SHA-256 holds for every copy. A check that crashed or timed out is not kept
(the next copy is checked afresh). Bounded, least recently used first out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final, TypeVar

from worker.models import PdfReport
from worker.relay.ports import Inspector

KNOWN_REPORTS: Final = 4096

_K = TypeVar("_K")


class ReportCache:
    """Checks files through an Inspector, each distinct content once."""

    def __init__(self, inspector: Inspector, *, size: int = KNOWN_REPORTS) -> None:
        self._inspector = inspector
        self._size = size
        self._known: OrderedDict[str, PdfReport] = OrderedDict()

    def check(self, files: Mapping[_K, bytes]) -> dict[_K, PdfReport | Exception]:
        """One report per file; the inspector sees each unknown content once, all of
        them in one `inspect_many` call (its workers run in parallel)."""
        digests = {key: hashlib.sha256(data).hexdigest() for key, data in files.items()}
        found: dict[str, PdfReport | Exception] = {}
        unknown: dict[str, bytes] = {}
        for key, digest in digests.items():
            if digest in found or digest in unknown:
                continue
            known = self._known.get(digest)
            if known is not None:
                self._known.move_to_end(digest)
                found[digest] = known
            else:
                unknown[digest] = files[key]
        checked = self._inspector.inspect_many(unknown.values())
        for digest, report in zip(unknown, checked, strict=True):
            found[digest] = report
            if isinstance(report, PdfReport):
                self._known[digest] = report
                if len(self._known) > self._size:
                    self._known.popitem(last=False)
        return {key: found[digest] for key, digest in digests.items()}
