"""Large parts decoded range by range give what decoding them whole gives."""

from __future__ import annotations

import base64
import random

import pytest

from tests import samples
from tests.fakes import FakeMailbox
from worker.mail.ranged import RangedFetch, fetch_decoded
from worker.mail.transfer import Base64Stream, decode_transfer

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"


def wrapped(data: bytes, width: int = 76) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join(text[at : at + width] for at in range(0, len(text), width)) + b"\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        wrapped(PDF),
        wrapped(PDF, width=64),
        wrapped(PDF[:-1]),  # one padding character
        wrapped(PDF[:-2]),  # two
        base64.b64encode(PDF),  # one long line
        b"".join(base64.b64encode(PDF[at : at + 10]) + b"\n" for at in range(0, len(PDF), 10)),
        base64.b64encode(PDF)[:-3],  # a last quantum cut short
        base64.b64encode(PDF)[:-5] + b"\r\n",
        b"",
        b"\r\n \t",
        b"QQ==QUI=QUJD",  # padding in the middle: each run decoded on its own
    ],
)
@pytest.mark.parametrize("cut", [1, 3, 7, 76, 1000, 1 << 20])
def test_stream_decodes_as_decode_transfer_does(raw: bytes, cut: int) -> None:
    stream = Base64Stream()
    for at in range(0, len(raw), cut):
        stream.feed(raw[at : at + cut])
    assert stream.finish() == decode_transfer(raw, "base64")


def test_random_cuts() -> None:
    rng = random.Random(4)
    raw = wrapped(PDF)
    for _ in range(50):
        stream = Base64Stream()
        at = 0
        while at < len(raw):
            step = rng.randint(1, 300)
            stream.feed(raw[at : at + step])
            at += step
        assert stream.finish() == PDF


@pytest.mark.parametrize(
    ("raw", "offset"),
    [(b"QUJD\r\nQU*J", 6), (b"QUJD" * 1000 + b"!", 4000), (b"\x00", 0)],
)
def test_broken_base64_is_refused_with_its_offset(raw: bytes, offset: int) -> None:
    stream = Base64Stream()
    with pytest.raises(ValueError, match=rf"broken base64: .* at offset {offset}"):
        for at in range(0, len(raw), 5):
            stream.feed(raw[at : at + 5])


@pytest.mark.parametrize("range_bytes", [100, 4096, None, 1 << 20])
def test_fetch_decoded_asks_range_after_range(range_bytes: int | None) -> None:
    mailbox = FakeMailbox()
    uid = mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", PDF)]))
    raw = mailbox.fetch_sections({uid: ["2"]})[(uid, "2")]
    size = range_bytes or len(raw)  # None: exactly the part's size
    assert isinstance(mailbox, RangedFetch)
    assert fetch_decoded(mailbox, uid, "2", range_bytes=size) == PDF
    # Ranges until one comes back short (an empty one when the size divides evenly).
    assert mailbox.calls.count("fetch_range") == len(raw) // size + 1


def test_fetch_decoded_of_a_vanished_part_is_none() -> None:
    assert fetch_decoded(FakeMailbox(), 99, "2") is None
