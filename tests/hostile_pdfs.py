"""Hostile PDFs written in raw PDF syntax: bombs, loops, absurd lengths and counts.

A small helper assembles numbered objects with an xref table and trailer; the files
need not be valid (most are not). `pdf_samples` lists each with the audit outcomes
that are right for it. Used through tests/corpus.py.
"""

from __future__ import annotations

import binascii
import functools
import io
import zlib
from collections.abc import Iterator, Sequence
from typing import Final, Literal

from pypdf import PdfReader, PdfWriter

MIB: Final = 1 << 20
BOMB_BYTES: Final = 300 * MIB  # what each decompression bomb inflates to
FORWARDED: Final = frozenset({"forwarded"})
REJECTED: Final = frozenset({"rejected"})
# For a hostile file that is still a readable PDF: the relay forwards bytes, it does not
# render them, so accepting it is as right as refusing it, if the check stayed in its caps.
EITHER: Final = frozenset({"forwarded", "rejected"})


def stream(entries: bytes, data: bytes, *, length: bytes | None = None) -> bytes:
    """A stream object's body; `length` overrides the true /Length."""
    declared = length if length is not None else str(len(data)).encode()
    return b"<< " + entries + b" /Length " + declared + b" >>\nstream\n" + data + b"\nendstream"


def assemble(
    objects: Sequence[bytes], *, root: int = 1, trailer: bytes = b"", version: bytes = b"1.7"
) -> bytes:
    """A PDF file of `objects` (numbered from 1) with a classic xref table and trailer."""
    out = io.BytesIO()
    out.write(b"%PDF-" + version + b"\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root %d 0 R " % (len(objects) + 1, root) + trailer)
    out.write(b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def text_content(label: str) -> bytes:
    """A content stream that prints one line (the invoice label keeps samples distinct)."""
    return b"BT /F1 14 Tf 72 760 Td (Invoice No. " + label.encode() + b") Tj ET"


FONT: Final = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def one_page(
    label: str,
    *,
    content: bytes | None = None,
    page_extra: bytes = b"",
    resources: bytes = b"/Font << /F1 5 0 R >>",
    extra: Sequence[bytes] = (),
    trailer: bytes = b"",
) -> bytes:
    """Catalog 1, pages 2, page 3, content 4, font 5, then `extra` objects from 6."""
    return assemble(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R"
            + b" /Resources << "
            + resources
            + b" >> "
            + page_extra
            + b" >>",
            content if content is not None else stream(b"", text_content(label)),
            FONT,
            *extra,
        ],
        trailer=trailer,
    )


@functools.cache
def flate_bomb() -> bytes:
    """BOMB_BYTES of zeros, deflated (about 300 KB); built once per process."""
    packer = zlib.compressobj(9)
    zeros = bytes(MIB)
    chunks = [packer.compress(zeros) for _ in range(BOMB_BYTES // MIB)]
    return b"".join(chunks) + packer.flush()


def with_image(label: str, image: bytes) -> bytes:
    """A page that draws image object 6 (given as its stream body) under its text."""
    drawing = text_content(label) + b"\nq 100 0 0 100 72 600 cm /Im1 Do Q"
    return one_page(
        label,
        content=stream(b"", drawing),
        resources=b"/Font << /F1 5 0 R >> /XObject << /Im1 6 0 R >>",
        extra=[image],
    )


IMAGE: Final = b"/Type /XObject /Subtype /Image /ColorSpace /DeviceGray /BitsPerComponent 8"


def prev_loop(base: bytes, *, cycle: Literal[1, 2]) -> bytes:
    """`base` plus incremental xref sections whose /Prev chain loops (onto itself or
    between two sections); the last section still points at the original one too."""
    original = int(base.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    out = io.BytesIO(base)
    out.seek(0, io.SEEK_END)
    first = out.tell()
    second = first + len(_xref_section(0, 0))  # both sections have the same length
    targets = [first] if cycle == 1 else [second, first]
    for target in targets:
        out.write(_xref_section(target, original))
    out.write(b"startxref\n%d\n%%%%EOF\n" % first)
    return out.getvalue()


def _xref_section(prev: int, original: int) -> bytes:
    return b"xref\n0 1\n0000000000 65535 f \ntrailer\n<< /Size 6 /Root 1 0 R /Prev %010d >>\n" % (
        prev or original
    )


def many_pages(label: str, count: int) -> bytes:
    """`count` pages sharing one content stream, flat under one /Pages node."""
    first_page = 5
    kids = b" ".join(b"%d 0 R" % (first_page + index) for index in range(count))
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 3 0 R"
        b" /Resources << /Font << /F1 4 0 R >> >> >>"
    )
    return assemble(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % count,
            stream(b"", text_content(label)),
            FONT,
            *([page] * count),
        ]
    )


def encrypted(label: str, *, algorithm: str, user_password: str) -> bytes:
    """A readable one-page PDF encrypted by pypdf (RC4-128, AES-128 or AES-256)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(one_page(label))))
    writer.encrypt(
        user_password=user_password, owner_password="owner-" + label, algorithm=algorithm
    )
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def pdf_samples() -> Iterator[tuple[str, bytes, frozenset[str]]]:
    """(name, PDF bytes, right outcomes) for every hostile PDF."""
    bomb = flate_bomb()
    flate = b"/Filter /FlateDecode"
    yield "flate bomb as page content", one_page("B1", content=stream(flate, bomb)), REJECTED
    yield (
        "flate bomb as image",
        with_image("B2", stream(IMAGE + b" /Width 16384 /Height 19200 " + flate, bomb)),
        REJECTED,
    )
    unused = stream(flate, bomb)
    yield "flate bomb never drawn", one_page("B3", extra=[unused]), EITHER
    twice = zlib.compress(bomb, 9)
    yield (
        "flate bomb deflated twice",
        one_page("B4", content=stream(b"/Filter [/FlateDecode /FlateDecode]", twice)),
        REJECTED,
    )
    hexed = binascii.hexlify(bomb) + b">"
    yield (
        "flate bomb in ASCIIHex",
        one_page("B5", content=stream(b"/Filter [/ASCIIHexDecode /FlateDecode]", hexed)),
        REJECTED,
    )
    runs = b"\x81\x00" * (2 * MIB)  # each pair: 128 zeros
    yield (
        "run-length bomb",
        one_page("B6", content=stream(b"/Filter /RunLengthDecode", runs + b"\x80")),
        REJECTED,
    )
    predictor = (
        b" /DecodeParms << /Predictor 15 /Colors 1 /BitsPerComponent 8 /Columns 400000000 >>"
    )
    yield (
        "PNG predictor with 400 M columns",
        with_image(
            "B7",
            stream(
                IMAGE + b" /Width 400000000 /Height 1 " + flate + predictor,
                zlib.compress(bytes(4096)),
            ),
        ),
        EITHER,
    )
    yield (
        "image of 2^31 x 2^31 pixels",
        with_image("B8", stream(IMAGE + b" /Width 2147483647 /Height 2147483647", bytes(64))),
        EITHER,
    )

    yield "object referencing itself as content", one_page("R1", content=b"4 0 R"), REJECTED
    yield "catalog referencing itself", assemble([b"1 0 R", b"<< >>"]), REJECTED
    yield (
        "/Pages kids cycle",
        assemble(
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Pages /Parent 2 0 R /Kids [2 0 R] /Count 1 >>",
            ]
        ),
        REJECTED,
    )
    yield (
        "/Pages node its own kid",
        assemble(
            [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [2 0 R] /Count 1 >>"]
        ),
        REJECTED,
    )
    yield (
        "/Parent loop without /MediaBox",
        assemble(
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Parent 3 0 R >>",
                b"<< /Type /Page /Parent 3 0 R /Contents 4 0 R"
                b" /Resources << /Font << /F1 5 0 R >> >> >>",
                stream(b"", text_content("R5")),
                FONT,
            ]
        ),
        EITHER,
    )
    yield "/Prev pointing at itself", prev_loop(one_page("X1"), cycle=1), EITHER
    yield "/Prev cycle of two sections", prev_loop(one_page("X2"), cycle=2), EITHER
    yield "xref stream claiming 2^31 entries", _xref_stream_pdf("X3"), EITHER
    yield (
        "object stream claiming 10^8 objects",
        one_page("X4", extra=[stream(b"/Type /ObjStm /N 100000000 /First 0", b"6 0 " * 64)]),
        EITHER,
    )

    lengths = {
        "/Length 10^11": b"99999999999",
        "/Length negative": b"-20",
        "/Length past the end of file": b"9000000",
        "/Length referencing its own stream": b"4 0 R",
    }
    for number, (name, length) in enumerate(lengths.items(), start=1):
        label = f"L{number}"
        yield name, one_page(label, content=stream(b"", text_content(label), length=length)), EITHER

    yield "5,000 pages", many_pages("P1", 5000), FORWARDED
    yield "50,000 objects", one_page("P2", extra=[b"%d" % n for n in range(50_000)]), FORWARDED
    yield (
        "content with 2 M operators",
        one_page(
            "P3",
            content=stream(
                flate, zlib.compress(text_content("P3") + b"\n" + b"0 0 m\n" * 2_000_000, 9)
            ),
        ),
        EITHER,
    )
    deep_array = b"[" * 50_000 + b"]" * 50_000
    yield "array nested 50,000 deep", one_page("P4", page_extra=b"/Annots " + deep_array), EITHER
    deep_dict = b"<< /A " * 50_000 + b">> " * 50_000
    yield "dictionary nested 50,000 deep", one_page("P5", page_extra=b"/Deep " + deep_dict), EITHER

    yield (
        "JBIG2 image (external decoder off)",
        with_image(
            "J1",
            stream(
                IMAGE.replace(b"/BitsPerComponent 8", b"/BitsPerComponent 1")
                + b" /Width 64 /Height 64 /Filter /JBIG2Decode",
                b"\x97JB2\r\n\x1a\n" + bytes(64),
            ),
        ),
        FORWARDED,
    )
    for algorithm in ("RC4-128", "AES-128", "AES-256"):
        for password in ("", "s3cret"):
            label = f"E-{algorithm}-{'open' if not password else 'locked'}"
            what = "empty user password" if not password else "a user password"
            yield (
                f"{algorithm} with {what}",
                encrypted(label, algorithm=algorithm, user_password=password),
                FORWARDED,
            )
    yield (
        "garbage between header and %%EOF",
        b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n",
        REJECTED,
    )


def _xref_stream_pdf(label: str) -> bytes:
    """A file whose only cross-reference section is a stream claiming 2^31 entries."""
    body = one_page(label).split(b"xref\n", 1)[0]
    rows = b"".join(b"\x01" + offset.to_bytes(4, "big") + b"\x00\x00" for offset in range(6))
    entries = b"/Type /XRef /Size 2147483647 /W [1 4 2] /Index [0 2147483647] /Root 1 0 R"
    xref_at = len(body)
    return (
        body
        + b"6 0 obj\n"
        + stream(entries, rows)
        + b"\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref_at
    )
