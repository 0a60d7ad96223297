"""A hostile corpus: mails built to crash, hang or exhaust a relay.

Every sample is built here and in tests/hostile_pdfs.py, by hand, from raw PDF syntax
and raw mail bytes (no binary fixture is committed); each says which audit outcomes
are right for it. Used by tests/integration/test_hostile_corpus.py.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from tests import samples
from tests.hostile_pdfs import FORWARDED, MIB, REJECTED, pdf_samples


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One hostile mail, what it tries, and the audit outcomes that are right for it."""

    name: str
    mail: bytes
    expect: frozenset[str]
    pdf: bytes | None = None  # the hostile PDF inside, for timing its check on its own
    carried: tuple[bytes, ...] = ()  # other PDFs inside that may be forwarded


# --- mails -------------------------------------------------------------------------------

CRLF: Final = b"\r\n"


def header_block(name: str, *, subject: bytes | None = None, sender: bytes | None = None) -> bytes:
    tag = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]
    return CRLF.join(
        [
            b"From: " + (sender or b"Shop <invoices@shop.example>"),
            b"To: invoices@shop.example",
            b"Subject: " + (subject or b"Hostile sample: " + name.encode()),
            b"Date: Mon, 24 Nov 2025 10:00:00 +0000",
            b"Message-ID: <corpus-" + tag.encode() + b"@shop.example>",
            b"MIME-Version: 1.0",
        ]
    )


def base64_body(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def pdf_part(
    data: bytes,
    *,
    filename: bytes = b'"invoice.pdf"',
    encoding: bytes = b"base64",
    encoded: bool = False,
    extra_headers: Sequence[bytes] = (),
) -> bytes:
    """A leaf part (headers, blank line, body) carrying `data` as application/pdf;
    `encoded` says `data` is the body as sent (otherwise it is base64-encoded here)."""
    body = data if encoded or encoding != b"base64" else base64_body(data)
    return CRLF.join(
        [
            b"Content-Type: application/pdf",
            b"Content-Transfer-Encoding: " + encoding,
            b"Content-Disposition: attachment; filename=" + filename,
            *extra_headers,
            b"",
            body,
        ]
    )


def multipart(parts: Sequence[bytes], *, boundary: bytes) -> bytes:
    """A multipart/mixed entity (its Content-Type header, blank line, parts)."""
    lines = [b'Content-Type: multipart/mixed; boundary="' + boundary + b'"', b""]
    for part in parts:
        lines += [b"--" + boundary, part]
    lines += [b"--" + boundary + b"--", b""]
    return CRLF.join(lines)


TEXT_PART: Final = b"Content-Type: text/plain; charset=utf-8\r\n\r\nInvoice attached.\r\n"


def mail(name: str, parts: Sequence[bytes], **headers: bytes) -> bytes:
    return header_block(name, **headers) + CRLF + multipart([TEXT_PART, *parts], boundary=b"=_b0")


def nested_rfc822(inner: bytes, levels: int) -> bytes:
    """`inner` (a whole mail) forwarded as message/rfc822 `levels` times."""
    for level in range(levels):
        wrapper = (
            header_block(f"nest {level}")
            + CRLF
            + multipart(
                [TEXT_PART, b"Content-Type: message/rfc822\r\n\r\n" + inner],
                boundary=b"=_n%d" % level,
            )
        )
        inner = wrapper
    return inner


def nested_multipart(leaf: bytes, levels: int) -> bytes:
    entity = leaf
    for level in range(levels):
        entity = multipart([entity], boundary=b"=_m%d" % level)
    return entity


def invoice(number: int) -> bytes:
    """A real, distinct invoice (for mails whose hostility is in the mail, not the PDF)."""
    return samples.invoice_pdf(number=f"C-{number}", logo=False)


def _pdf_mails() -> Iterator[Sample]:
    for name, data, expect in pdf_samples():
        filename = b'"' + name.replace('"', "").encode() + b'.pdf"'
        yield Sample(
            name=name, mail=mail(name, [pdf_part(data, filename=filename)]), expect=expect, pdf=data
        )


def _mime_mails() -> Iterator[Sample]:
    yield Sample(
        name="3,000 MIME parts", mail=mail("3,000 MIME parts", [TEXT_PART] * 3000), expect=REJECTED
    )
    deep = mail("deep inner", [pdf_part(invoice(1))])
    for levels in (15, 60):
        yield Sample(
            name=f"message/rfc822 nested {levels} deep",
            mail=nested_rfc822(deep, levels),
            expect=REJECTED,
        )
    leaf = pdf_part(invoice(2))
    name = "multipart nested 200 deep"
    yield Sample(
        name=name, mail=header_block(name) + CRLF + nested_multipart(leaf, 200), expect=REJECTED
    )

    broken = base64_body(invoice(3))
    broken = broken[:300] + b"!!**not base64**!!\r\n" + broken[400:]
    yield Sample(
        name="broken base64",
        mail=mail("broken base64", [pdf_part(broken, encoding=b"base64", encoded=True)]),
        expect=REJECTED,
    )
    quoted = binascii.b2a_qp(invoice(4), istext=False).replace(b"=\n", b"=\r\n")
    middle = len(quoted) // 2
    quoted = quoted[:middle] + b"=ZZ=G1=\r\n=" + quoted[middle:]
    yield Sample(
        name="broken quoted-printable",
        mail=mail(
            "broken quoted-printable",
            [pdf_part(quoted, encoding=b"quoted-printable", encoded=True)],
        ),
        expect=REJECTED,
    )
    cut = mail("mail cut mid-attachment", [pdf_part(invoice(5))])
    yield Sample(name="mail cut mid-attachment", mail=cut[: len(cut) * 2 // 3], expect=REJECTED)
    yield Sample(
        name="empty PDF part", mail=mail("empty PDF part", [pdf_part(b"")]), expect=REJECTED
    )
    fakes = [
        pdf_part(b"not a PDF, number %d\r\n" % n, filename=b'"fake-%d.pdf"' % n) for n in range(95)
    ]
    yield Sample(
        name="95 fake PDFs in one mail",
        mail=mail("95 fake PDFs in one mail", fakes),
        expect=REJECTED,
    )

    yield Sample(
        name="unknown charsets in subject, sender, filename",
        mail=mail(
            "unknown charsets in subject, sender, filename",
            [pdf_part(invoice(6), filename=b'"=?x-no-such-charset?q?Rechnung_=FC?=.pdf"')],
            subject=b"=?x-no-such-charset?q?Rechnung_=FC=FF?= =?utf-8?b?/w==?=",
            sender=b"Sh\xf6p \xff\xfe <invoices@shop.example>",
        ),
        expect=FORWARDED,
        carried=(invoice(6),),
    )
    yield Sample(
        name="RFC 2231 filename in a bogus charset",
        mail=mail(
            "RFC 2231 filename in a bogus charset",
            [pdf_part(invoice(7), filename=b"x;\r\n filename*=x-bogus''%FF%FE%C3%28inv.pdf")],
        ),
        expect=FORWARDED,
        carried=(invoice(7),),
    )
    yield Sample(
        name="NUL, CR and LF in filenames",
        mail=mail(
            "NUL, CR and LF in filenames",
            [
                pdf_part(
                    invoice(8),
                    filename=b"x;\r\n filename*=utf-8''a%00b%0D%0ABcc%3A%20x%40evil.example.pdf",
                ),
                pdf_part(invoice(9), filename=b'"=?utf-8?q?c=00d=0D=0AX-Evil:_1.pdf?="'),
                pdf_part(invoice(11), filename=b'"raw\x00NUL and bare\rCR.pdf"'),
            ],
        ),
        expect=FORWARDED,
        carried=(invoice(8), invoice(9), invoice(11)),
    )
    yield Sample(
        name="absurd Content-Length header",
        mail=mail(
            "absurd Content-Length header",
            [pdf_part(invoice(10), extra_headers=[b"Content-Length: 99999999999999999999999"])],
        ),
        expect=FORWARDED,
        carried=(invoice(10),),
    )


def _big_mails() -> Iterator[Sample]:
    """Over INVOICE_RELAY_MAX_PDF_BYTES (30 MiB) and INVOICE_RELAY_MAX_MAIL_BYTES (50 MiB)
    at their defaults: neither is downloaded."""
    big_pdf = b"%PDF-1.7\n" + bytes(31 * MIB) + b"\n%%EOF\n"
    yield Sample(
        name="31 MiB PDF attachment",
        mail=mail("31 MiB PDF attachment", [pdf_part(big_pdf)]),
        expect=REJECTED,
    )
    huge_pdf = b"%PDF-1.7\n" + bytes(38 * MIB) + b"\n%%EOF\n"  # about 51.5 MiB as base64
    yield Sample(
        name="mail of 51 MiB", mail=mail("mail of 51 MiB", [pdf_part(huge_pdf)]), expect=REJECTED
    )


def hostile_corpus() -> list[Sample]:
    """Every sample, hostile PDFs first; names are unique."""
    corpus = [*_pdf_mails(), *_mime_mails(), *_big_mails()]
    assert len({sample.name for sample in corpus}) == len(corpus)
    return corpus
