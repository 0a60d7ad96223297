"""Mails that try to inject headers into the forwarded mail, and the check that they did
not: used against the fakes (tests/unit/relay/test_hostile.py) and the real SMTP sink
(tests/integration/test_spoofing.py)."""

from __future__ import annotations

import base64
from email import message_from_bytes, policy
from email.message import EmailMessage

from tests import samples

# What a forwarded mail carries, and nothing else (worker.delivery.message.build_forward).
FORWARD_HEADERS = frozenset(
    {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "auto-submitted",
        "x-invoice-relay",
        "mime-version",
        "content-type",
    }
)
PART_HEADERS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition", "mime-version"}
)
INJECTED = (b"bcc:", b"x-evil:", b"to: evil", b"content-type: text/html")


def _pdf(number: int) -> bytes:
    # A real invoice (the real PDF check must accept it); each mail's is another one.
    return samples.invoice_pdf(number=str(5000 + number), logo=False)


def _mail(*, sender: bytes, subject: bytes, disposition: bytes, number: int) -> bytes:
    return b"\r\n".join(
        [
            b"From: " + sender,
            b"To: invoices@shop.example",
            b"Subject: " + subject,
            b"Date: Mon, 24 Nov 2025 10:00:00 +0000",
            b"Message-ID: <hostile-%d@shop.example>" % number,
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="b"',
            b"",
            b"--b",
            b"Content-Type: text/plain; charset=utf-8",
            b"",
            b"Invoice attached.",
            b"--b",
            b"Content-Type: application/pdf",
            b"Content-Transfer-Encoding: base64",
            b"Content-Disposition: " + disposition,
            b"",
            base64.encodebytes(_pdf(number)).replace(b"\n", b"\r\n"),
            b"--b--",
            b"",
        ]
    )


def injection_mails() -> dict[str, bytes]:
    """One mail per way in: subject, filename and sender, raw and as encoded words."""
    shop = b"Shop <invoices@shop.example>"
    attachment = b'attachment; filename="invoice.pdf"'
    cases = {
        "subject: encoded CR LF": (shop, b"=?utf-8?q?Invoice=0D=0ABcc:_evil@x.example?=", None),
        "subject: encoded LF NUL": (
            shop,
            b"=?utf-8?b?" + base64.b64encode(b"Invoice\nX-Evil: 1\x00\r\n\r\nbody") + b"?=",
            None,
        ),
        "subject: raw NUL ESC": (shop, b"Invoice\x00 Bcc: evil@x.example\x1b[2J", None),
        "filename: RFC 2231 CR LF NUL": (
            shop,
            b"Invoice 1",
            b"attachment; filename*=utf-8''a%0D%0ABcc%3A%20evil%40x.example%00.pdf",
        ),
        "filename: encoded word CR LF": (
            shop,
            b"Invoice 2",
            b'attachment; filename="=?utf-8?q?b=0D=0AX-Evil:_1.pdf?="',
        ),
        "filename: quoted LF in name": (
            shop,
            b"Invoice 3",
            b'attachment;\r\n filename="c\\\r\nContent-Type: text/html.pdf"',
        ),
        "sender: encoded CR LF in display name": (
            b"=?utf-8?q?Shop=0D=0ABcc:_evil@x.example?= <invoices@shop.example>",
            b"Invoice 4",
            None,
        ),
        "sender: NUL and LF in quoted name": (
            b'"Shop\x00\\\nX-Evil: 1" <invoices@shop.example>',
            b"Invoice 5",
            None,
        ),
    }
    mails: dict[str, bytes] = {}
    for number, (name, (sender, subject, disposition)) in enumerate(cases.items()):
        mails[name] = _mail(
            sender=sender,
            subject=subject,
            disposition=disposition or attachment,
            number=number,
        )
    return mails


def injected_headers(raw: bytes) -> list[str]:
    """What in a forwarded mail's bytes is not a header it should carry: [] when clean."""
    problems: list[str] = []
    if b"\x00" in raw:
        problems.append("NUL byte")
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(INJECTED):
            problems.append(f"line {line[:40]!r}")
    if b"\r" in raw.replace(b"\r\n", b"") or b"\n" in raw.replace(b"\r\n", b""):
        problems.append("bare CR or LF")
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    names = {key.lower() for key, _ in message.items()}
    problems += [f"header {name}" for name in sorted(names - FORWARD_HEADERS)]
    for part in message.iter_parts():
        extra = {key.lower() for key, _ in part.items()} - PART_HEADERS
        problems += [f"part header {name}" for name in sorted(extra)]
    if len(message.get_all("Subject") or []) != 1:
        problems.append("not exactly one Subject")
    return problems
