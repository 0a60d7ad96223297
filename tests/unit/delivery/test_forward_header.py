"""The `X-Invoice-Relay` header of a forwarded mail is one line, never folded: folded
after the colon, a receiver reads the SHA-256 with a leading space."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser

import pytest

from worker.delivery.message import RELAY_HEADER, build_forward
from worker.models import OutgoingDocument, Parcel

SHA = hashlib.sha256(b"invoice").hexdigest()


def document(*, sha256: str = SHA, resend_count: int = 0) -> OutgoingDocument:
    return OutgoingDocument(
        document_id=1,
        sha256=sha256,
        content=b"%PDF-1.7\n%%EOF\n",
        filename="Invoice 1042 with a long name that folds other headers.pdf",
        attempts=0,
        resend_count=resend_count,
        original_sender="Printout Designer <noreply@printout.example>",
        original_subject="Invoice " + "long words " * 20,
        original_date=None,
        original_message_id="<abc@printout.example>",
    )


@pytest.mark.parametrize(
    "outgoing",
    [document(), document(sha256=SHA.upper()), document(resend_count=3)],
    ids=["first send", "upper-case hash", "resend"],
)
def test_the_relay_header_is_one_line_and_parses_exactly(outgoing: OutgoingDocument) -> None:
    raw = build_forward(
        Parcel.from_outgoing(outgoing),
        forward_to="inbox@getmyinvoices.example",
        forward_from="relay@shop.example",
        now=datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
    ).as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    [line] = [index for index, text in enumerate(head) if text.startswith(b"X-Invoice-Relay:")]
    assert head[line] == f"{RELAY_HEADER}: {SHA}".encode("ascii")
    assert not head[line + 1].startswith((b" ", b"\t"))  # no continuation line
    for parse_policy in (policy.default, policy.compat32):
        assert str(BytesParser(policy=parse_policy).parsebytes(raw)[RELAY_HEADER]) == SHA
