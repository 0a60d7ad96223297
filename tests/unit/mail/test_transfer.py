"""Tables for worker.mail.transfer: the whole and the streaming base64 decoder are one.

Every row is decoded whole (`decode_transfer`, with its strict fast path) and fed to a
`Base64Stream` in pieces of every size from 1 octet up: both must give the row's bytes,
or both refuse it at the same offset.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.mail.transfer import Base64Stream, decode_base64, decode_transfer

DATA = bytes(range(256)) * 3

# (id, raw, decoded)
DECODE_CASES: list[tuple[str, bytes, bytes]] = [
    ("empty", b"", b""),
    ("one quantum", b"QUJD", b"ABC"),
    ("well-formed", base64.b64encode(DATA), DATA),
    ("76-character CRLF lines", base64.encodebytes(DATA).replace(b"\n", b"\r\n"), DATA),
    ("LF lines", base64.encodebytes(DATA), DATA),
    ("bare CR lines", base64.encodebytes(DATA).replace(b"\n", b"\r"), DATA),
    ("spaces, tabs, VT, FF", b" QU\tJD\x0bQU\x0cJD ", b"ABCABC"),
    ("only whitespace", b" \r\n\t\x0b\x0c", b""),
    # padding
    ("one padding character", b"QUI=", b"AB"),
    ("two padding characters", b"QQ==", b"A"),
    ("missing padding, two octets", b"QUI", b"AB"),
    ("missing padding, one octet", b"QQ", b"A"),
    ("extra padding", b"QUJD====", b"ABC"),
    ("padding after a short quantum", b"QQ=", b"A"),
    ("padding alone", b"====", b""),
    ("padding first", b"==QUJD", b"ABC"),
    ("padding mid-text", b"QQ==QUI=QUJD", b"AABABC"),
    ("padding per line", b"QQ==\r\nQUI=\r\nQUJD\r\n", b"AABABC"),
    ("padding inside a quantum", b"QU=JD", b"A$"),  # "QU" and "JD" decoded apart
    ("dangling character", base64.b64encode(b"ab") + b"Q", b"ab"),
    ("dangling character before padding", b"QUJDQ=", b"ABC"),
    ("single character", b"Q", b""),
    ("cut mid-quantum", base64.b64encode(DATA)[:-2], DATA[:-2]),
    ("cut mid-quantum with a line break", base64.b64encode(DATA)[:-5] + b"\r\n", DATA[:-4]),
]


def _stream(raw: bytes, cut: int) -> bytes:
    stream = Base64Stream()
    for at in range(0, len(raw), cut):
        stream.feed(raw[at : at + cut])
    return stream.finish()


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [case[1:] for case in DECODE_CASES],
    ids=[case[0] for case in DECODE_CASES],
)
@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 7, 76, 1 << 20])
def test_whole_and_streamed_give_the_same_bytes(raw: bytes, decoded: bytes, cut: int) -> None:
    assert decode_transfer(raw, "base64") == decoded
    assert decode_base64(raw) == decoded
    assert _stream(raw, cut) == decoded


# (id, raw, offset of the refused byte, whitespace left out)
JUNK_CASES: list[tuple[str, bytes, int]] = [
    ("NUL", b"\x00", 0),
    ("asterisk after a line", b"QUJD\r\nQU*J", 6),
    ("junk after much text", b"QUJD" * 1000 + b"!", 4000),
    ("URL-safe alphabet", b"QUJD-_", 4),
    ("8-bit byte", b"QU\xffJD", 2),
    ("dot", b"QUJD.", 4),
    ("junk after padding", b"QQ==#", 4),
    ("raw PDF labelled base64", b"%PDF-1.7", 0),
]


@pytest.mark.parametrize(
    ("raw", "offset"),
    [case[1:] for case in JUNK_CASES],
    ids=[case[0] for case in JUNK_CASES],
)
@pytest.mark.parametrize("cut", [1, 3, 5, 1 << 20])
def test_junk_is_refused_at_the_same_offset(raw: bytes, offset: int, cut: int) -> None:
    refused = raw.translate(None, b" \r\n")[offset]
    message = rf"^broken base64: byte 0x{refused:02x} at offset {offset}$"
    with pytest.raises(ValueError, match=message):
        decode_transfer(raw, "base64")
    with pytest.raises(ValueError, match=message):
        _stream(raw, cut)


BASE64_ISH = st.binary(max_size=120).map(base64.b64encode) | st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \r\n", max_size=120
).map(str.encode)


@given(BASE64_ISH, st.integers(min_value=1, max_value=50))
def test_whole_and_streamed_agree_on_any_alphabet_text(raw: bytes, cut: int) -> None:
    assert decode_transfer(raw, "base64") == _stream(raw, cut)


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_whole_and_streamed_agree_on_any_bytes(raw: bytes, cut: int) -> None:
    try:
        whole: bytes | str = decode_transfer(raw, "base64")
    except ValueError as exc:
        whole = str(exc)
    try:
        streamed: bytes | str = _stream(raw, cut)
    except ValueError as exc:
        streamed = str(exc)
    assert whole == streamed
