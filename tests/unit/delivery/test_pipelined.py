"""The pure parts of pipelined SMTP: the envelope's bytes, BDAT chunks and commands."""

from __future__ import annotations

import pytest

from worker.delivery.pipelined import bdat_command, chunks, envelope


@pytest.mark.parametrize(
    ("pieces", "size", "expected"),
    [
        ([], 4, [(b"", True)]),  # an empty content is still one chunk: BDAT 0 LAST
        ([b"ab"], 4, [(b"ab", True)]),
        ([b"ab", b"cd"], 4, [(b"abcd", True)]),
        ([b"ab", b"cd", b"e"], 4, [(b"abcd", False), (b"e", True)]),
        ([b"abcdef", b"gh"], 4, [(b"abcdef", False), (b"gh", True)]),
        ([b"abcd", b"efgh"], 4, [(b"abcd", False), (b"efgh", True)]),
        ([b"ab", b"", b"cd", b""], 4, [(b"abcd", True)]),
    ],
)
def test_chunks_are_at_least_the_size_and_only_the_last_is_last(
    pieces: list[bytes], size: int, expected: list[tuple[bytes, bool]]
) -> None:
    assert list(chunks(pieces, size)) == expected


@pytest.mark.parametrize(
    ("chunk", "last", "expected"),
    [
        (b"hello", True, b"BDAT 5 LAST\r\nhello"),
        (b"hello", False, b"BDAT 5\r\nhello"),
        (b"", True, b"BDAT 0 LAST\r\n"),
        (b".\r\n", True, b"BDAT 3 LAST\r\n.\r\n"),  # no dot-stuffing in BDAT
    ],
)
def test_bdat_command(chunk: bytes, last: bool, expected: bytes) -> None:
    assert bdat_command(chunk, last=last) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (False, b"MAIL FROM:<relay@shop.example>\r\nRCPT TO:<inbox@gmi.example>\r\n"),
        (True, b"MAIL FROM:<relay@shop.example>\r\nRCPT TO:<inbox@gmi.example>\r\nDATA\r\n"),
    ],
)
def test_envelope(data: bool, expected: bytes) -> None:
    assert envelope("relay@shop.example", "inbox@gmi.example", data=data) == expected
