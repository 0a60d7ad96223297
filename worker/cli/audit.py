"""Pure: the audit log's rows as a table, CSV or JSON for `invoice-relay audit`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from enum import Enum

from worker.mail.csvsafe import write_csv
from worker.mail.text import clean_text
from worker.models import AuditRow

COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AuditRow))

# The terminal table shows what answers "did it go through?"; CSV and JSON carry all.
TABLE_COLUMNS: tuple[str, ...] = (
    "id",
    "received_at",
    "uid",
    "sender",
    "filename",
    "invoice_number",
    "outcome",
    "duplicate_of",
    "reason",
)
_WIDTH_CAP = {"sender": 32, "filename": 32, "reason": 48}


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, int | str):
        return value
    return _text(value)


def as_json(rows: Sequence[AuditRow]) -> str:
    return json.dumps(
        [{name: _json_value(getattr(row, name)) for name in COLUMNS} for row in rows],
        indent=2,
        ensure_ascii=False,
    )


def as_csv(rows: Sequence[AuditRow]) -> str:
    """All columns; formula-like text neutralised (`worker.mail.csvsafe`)."""
    return write_csv(COLUMNS, ([getattr(row, name) for name in COLUMNS] for row in rows))


def _cell(name: str, value: object) -> str:
    # One line per row, and no terminal escape from a stranger's sender or filename.
    text = _text(value)
    return clean_text(text, _WIDTH_CAP.get(name, len(text)), mark_cut=True)


def as_table(rows: Sequence[AuditRow]) -> str:
    if not rows:
        return "(no rows)\n"
    cells = [[_cell(name, getattr(row, name)) for name in TABLE_COLUMNS] for row in rows]
    widths = [
        max(len(name), *(len(line[index]) for line in cells))
        for index, name in enumerate(TABLE_COLUMNS)
    ]
    lines = [
        "  ".join(name.ljust(width) for name, width in zip(TABLE_COLUMNS, widths, strict=True)),
        "  ".join("-" * width for width in widths),
    ]
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )
    return "\n".join(lines) + "\n"


FORMATTERS = {"table": as_table, "csv": as_csv, "json": as_json}
