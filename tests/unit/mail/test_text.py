"""Tables for worker.mail.text: the one cleaner every subject, filename and reason passes."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.mail.text import ELLIPSIS, clean_filename, clean_text

PERSIAN = (
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # "I want": ZWNJ keeps the letters apart
)

# (id, value, limit, expected)
TEXT_CASES: list[tuple[str, str, int, str]] = [
    ("plain", "Invoice 1042", 100, "Invoice 1042"),
    ("empty", "", 10, ""),
    (
        "non-ASCII kept",
        "Rechnung Nr. 1042 \u2013 Müller GmbH",
        100,
        "Rechnung Nr. 1042 \u2013 Müller GmbH",
    ),
    ("CJK kept", "請求書 2024", 100, "請求書 2024"),
    # whitespace of every kind separates words: one space per run, none at the ends
    ("CR LF", "a\r\nb", 10, "a b"),
    (
        "header injection",
        "Invoice\r\nBcc: victim@example.org",
        100,
        "Invoice Bcc: victim@example.org",
    ),
    ("bare CR", "a\rb", 10, "a b"),
    ("bare LF", "a\nb", 10, "a b"),
    ("tab", "a\tb", 10, "a b"),
    ("vertical tab and form feed", "a\x0bb\x0cc", 10, "a b c"),
    ("C0 separators", "a\x1cb\x1dc\x1ed\x1fe", 10, "a b c d e"),
    ("NEL", "a\x85b", 10, "a b"),
    ("no-break space", "a\u00a0b", 10, "a b"),
    ("ideographic space", "a\u3000b", 10, "a b"),
    ("en and em space", "a\u2002b\u2003c", 10, "a b c"),
    ("line separator", "line\u2028sep", 20, "line sep"),
    ("paragraph separator", "para\u2029sep\u2029", 20, "para sep"),
    ("runs folded", "  many   spaces  ", 20, "many spaces"),
    ("mixed run folded", "a \r\n\t \u00a0 b", 10, "a b"),
    ("only whitespace", " \r\n\t ", 10, ""),
    ("folded header", "mx.example;\r\n\tdkim=pass", 100, "mx.example; dkim=pass"),
    # other controls vanish without a space
    ("NUL", "a\x00b", 10, "ab"),
    ("ESC sequence", "Invoice\x1b[31m red", 100, "Invoice[31m red"),
    ("C0 controls", "a\x01\x02\x07\x08b", 10, "ab"),
    ("DEL", "a\x7fb", 10, "ab"),
    ("C1 controls", "a\x80\x9b\x9fb", 10, "ab"),
    ("every C0 and C1 control", "".join(map(chr, [*range(32), *range(127, 160)])), 100, ""),
    ("lone surrogate", "a\udcffb", 10, "ab"),
    ("controls then spaces", "a\x00 \x00b", 10, "a b"),
    # invisible format characters vanish: bidi controls disguise extensions
    ("right-to-left override", "invoice\u202efdp.exe", 100, "invoicefdp.exe"),
    ("bidi embeddings and pop", "\u202aa\u202bb\u202cc\u202dd", 10, "abcd"),
    ("bidi isolates", "\u2066a\u2067b\u2068c\u2069", 10, "abc"),
    ("bidi marks", "a\u200eb\u200fc\u061cd", 10, "abcd"),
    ("zero-width space", "in\u200bvoice", 10, "invoice"),
    ("soft hyphen", "in\u00advoice", 10, "invoice"),
    ("byte order mark", "\ufeffInvoice", 10, "Invoice"),
    ("word joiner", "a\u2060b", 10, "ab"),
    ("tag characters", "a\U000e0041\U000e007fb", 10, "ab"),
    # ... but the joiners stay: scripts and emoji need them
    ("zero-width non-joiner", PERSIAN, 10, PERSIAN),
    ("zero-width joiner", "\U0001f468\u200d\U0001f469", 10, "\U0001f468\u200d\U0001f469"),
    # private use and unassigned code points are shown as they are
    ("private use", "a\ue000b", 10, "a\ue000b"),
    # the cap counts characters and cuts hard, dropping a space at the cut
    ("at the cap", "abcde", 5, "abcde"),
    ("over the cap", "abcdef", 5, "abcde"),
    ("cut at a space", "cut here please", 8, "cut here"),
    ("space at the cut dropped", "cut  here", 4, "cut"),
    ("cap counts code points", "ü" * 10, 3, "üüü"),
    ("cap counts after folding", "a \r\n b", 3, "a b"),
    ("cap counts after vanishing", "a\x00\x00\x00b", 2, "ab"),
    ("zero cap", "abc", 0, ""),
]


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [case[1:] for case in TEXT_CASES],
    ids=[case[0] for case in TEXT_CASES],
)
def test_clean_text(value: str, limit: int, expected: str) -> None:
    assert clean_text(value, limit) == expected


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly 10", 10, "exactly 10"),
        ("one too long", 11, "one too lo" + ELLIPSIS),
        ("cut at a space here", 9, "cut at a" + ELLIPSIS),
        ("cut right after  spaces", 11, "cut right" + ELLIPSIS),
        ("ab", 1, ELLIPSIS),
        ("ab", 0, ""),
        ("a\r\n\r\nb", 3, "a b"),  # folding makes it fit: nothing cut, no mark
    ],
)
def test_clean_text_marks_a_cut_when_asked(value: str, limit: int, expected: str) -> None:
    assert clean_text(value, limit, mark_cut=True) == expected
    assert len(expected) <= limit


def test_a_negative_cap_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="limit must not be negative"):
        clean_text("a", -1)


# (id, value, limit, expected)
FILENAME_CASES: list[tuple[str, str, int, str]] = [
    ("plain", "invoice-1042.pdf", 255, "invoice-1042.pdf"),
    ("spaces and umlauts", "Rechnung Müller.pdf", 255, "Rechnung Müller.pdf"),
    ("spaces folded", "  Rechnung   1042 .pdf ", 255, "Rechnung 1042 .pdf"),
    ("unix path", "../../etc/passwd.pdf", 255, "passwd.pdf"),
    ("windows path", "C:\\Users\\shop\\invoice.pdf", 255, "invoice.pdf"),
    ("mixed separators", "a/b\\c.pdf", 255, "c.pdf"),
    ("only a directory", "../", 255, ""),
    ("dot", ".", 255, ""),
    ("dot dot", "..", 255, ""),
    ("hidden file", ".hidden.pdf", 255, "hidden.pdf"),
    ("dots and spaces first", " . .x.pdf", 255, "x.pdf"),
    ("only an extension", ".pdf", 255, "pdf"),
    ("trailing spaces", "x.pdf   ", 255, "x.pdf"),
    ("empty", "", 255, ""),
    ("only separators and NUL", "/\\\x00", 255, ""),
    ("NUL vanishes", "nul\x00byte.pdf", 255, "nulbyte.pdf"),
    ("line breaks separate", "in\r\nvoice.pdf", 255, "in voice.pdf"),
    ("injection", "in\r\nContent-Type: text html\r\n.pdf", 255, "in Content-Type: text html .pdf"),
    ("bidi override", "invoice\u202efdp.exe", 255, "invoicefdp.exe"),
    ("bidi hidden separator", "a/\u202e../b.pdf", 255, "b.pdf"),
    # a long name keeps its extension (up to 16 characters after the last dot)
    ("at the cap", "a" * 251 + ".pdf", 255, "a" * 251 + ".pdf"),
    ("keeps extension", "a" * 300 + ".pdf", 255, "a" * 251 + ".pdf"),
    ("keeps extension, smaller cap", "a" * 300 + ".pdf", 200, "a" * 196 + ".pdf"),
    ("no extension", "b" * 300, 200, "b" * 200),
    ("long extension is cut", "c" * 250 + "." + "x" * 40, 255, "c" * 250 + "." + "x" * 4),
    ("16-character extension kept", "d" * 300 + "." + "e" * 16, 100, "d" * 83 + "." + "e" * 16),
    ("17-character extension cut", "d" * 300 + "." + "e" * 17, 100, "d" * 100),
    ("stem space at the cut dropped", "ab cd.pdf", 7, "ab.pdf"),
    ("extension as long as the cap", "a.pdfx", 5, "a.pdf"),
    ("only an extension is too long", "." + "p" * 20, 10, "p" * 10),
]


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [case[1:] for case in FILENAME_CASES],
    ids=[case[0] for case in FILENAME_CASES],
)
def test_clean_filename(value: str, limit: int, expected: str) -> None:
    assert clean_filename(value, limit) == expected


def _shown(char: str) -> bool:
    """Whether a character may be in a cleaned text: no control, no format character
    but the joiners, no surrogate, no whitespace but the plain space."""
    category = unicodedata.category(char)
    if char == " ":
        return True
    if char.isspace() or category in ("Cc", "Cs"):
        return False
    return category != "Cf" or char in "\u200c\u200d"


@given(st.text(), st.integers(min_value=0, max_value=300), st.booleans())
def test_clean_text_keeps_its_promises(value: str, limit: int, mark_cut: bool) -> None:
    cleaned = clean_text(value, limit, mark_cut=mark_cut)
    assert len(cleaned) <= limit
    assert all(_shown(char) for char in cleaned)
    assert cleaned == cleaned.strip(" ")
    assert "  " not in cleaned
    assert clean_text(cleaned, limit) == cleaned  # cleaning twice changes nothing


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_clean_filename_keeps_its_promises(value: str, limit: int) -> None:
    name = clean_filename(value, limit)
    assert len(name) <= limit
    assert all(_shown(char) for char in name)
    assert "/" not in name and "\\" not in name
    assert not name.startswith((".", " ")) and not name.endswith(" ")
