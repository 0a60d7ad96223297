"""The one text cleaner: what a stranger wrote, made safe to store, show and forward.

Every subject, sender, filename, SMTP answer and reason that reaches a header, a log
line, the audit table or a notice goes through `clean_text`. One set of rules:

* Whitespace of any kind (`str.isspace`: CR, LF, TAB, VT, FF, the C0 separators
  U+001C..U+001F, NEL, no-break and other Unicode spaces, the line and paragraph
  separators U+2028/U+2029) separates words: each run becomes one space, and none is
  left at either end. So no text can start a header line of its own.
* Other control characters (the rest of C0, DEL, C1), lone surrogates and invisible
  format characters (Unicode category Cf: the bidi marks, embeddings, overrides and
  isolates that disguise `fdp.exe` as `exe.pdf`, zero-width space, soft hyphen, BOM)
  vanish, without a space: they were never a word boundary a reader could see. The
  zero-width joiner and non-joiner stay; scripts and emoji need them to join visibly.
* The cap counts characters (code points). A longer text is cut at `limit` and loses
  any space at the cut; with `mark_cut` its last character becomes "…" so a reader
  knows there was more. Values that identify something (Message-ID, address,
  filename) are cut without a mark: the mark would be a character nobody sent.
"""

from __future__ import annotations

import re
import unicodedata

ELLIPSIS = "…"
EXTENSION_MAX_CHARS = 16  # a longer "extension" is part of the name, cut like the rest

_JOINERS = frozenset("\u200c\u200d")  # zero-width non-joiner and joiner
_PATH_SEPARATOR = re.compile(r"[/\\]")


def _visible(value: str) -> str:
    kept: list[str] = []
    for char in value:
        if char.isspace():
            kept.append(" ")
            continue
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") or (category == "Cf" and char not in _JOINERS):
            continue
        kept.append(char)
    return "".join(kept)


def clean_text(value: str, limit: int, *, mark_cut: bool = False) -> str:
    """`value` as one line under the module's rules, at most `limit` characters."""
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    # Nearly every value is printable already (no controls, no Cf, no space but " "):
    # then only the folding of spaces is left, done by str.split in C.
    text = value if value.isprintable() else _visible(value)
    folded = " ".join(text.split())
    if len(folded) <= limit:
        return folded
    if mark_cut and limit > 0:
        return folded[: limit - 1].rstrip() + ELLIPSIS
    return folded[:limit].rstrip()


def clean_filename(value: str, limit: int) -> str:
    """A leaf name: `clean_text`'s rules, then only what follows the last `/` or `\\`,
    without leading dots or spaces (no hidden file, no `..`); "" when nothing is left.

    A name longer than `limit` keeps its extension (up to 16 characters after the last
    dot) and loses the end of its stem, so `….pdf` still says PDF.
    """
    text = clean_text(value, len(value))
    name = _PATH_SEPARATOR.split(text)[-1].lstrip(". ").rstrip()
    if len(name) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if dot and stem and 0 < len(extension) <= min(EXTENSION_MAX_CHARS, limit - 2):
        return stem[: limit - len(extension) - 1].rstrip() + dot + extension
    return name[:limit].rstrip()
