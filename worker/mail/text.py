"""Cleaning text that a stranger wrote (subjects, names, reasons) for one line of output."""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def _drop_controls(value: str) -> str:
    # Cc covers CR, LF, NUL, TAB and DEL; Zl/Zp are the Unicode line and paragraph
    # separators, which some readers treat as line breaks too. They become spaces so
    # that words on either side stay apart.
    return "".join(
        " " if unicodedata.category(char) in {"Cc", "Zl", "Zp"} else char for char in value
    )


def clean_text(value: str, limit: int) -> str:
    """One line of text: control characters removed, whitespace collapsed, at most `limit`."""
    collapsed = _WHITESPACE.sub(" ", _drop_controls(value)).strip()
    return collapsed[:limit].rstrip()
