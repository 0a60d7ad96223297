"""End to end: `invoice-relay` as a user runs it, against Dovecot, the SMTP sink and
SQLite or PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tests import samples
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.tls import TestCA

FORWARD_TO = "inbox-4711@getmyinvoices.example"
FORWARD_FROM = "relay@shop.example"


def relay_env(
    imap: DovecotServer,
    smtp: SmtpSink,
    database_url: str,
    *,
    smtp_ca: TestCA | None = None,
    **extra: str,
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(imap.config_file.parent),
        "INVOICE_RELAY_IMAP_HOST": "localhost",
        "INVOICE_RELAY_IMAP_PORT": str(imap.tls_port),
        "INVOICE_RELAY_IMAP_SECURITY": "ssl",
        "INVOICE_RELAY_IMAP_USER": imap.user,
        "INVOICE_RELAY_IMAP_PASSWORD": imap.password,
        "INVOICE_RELAY_SMTP_HOST": "localhost",
        "INVOICE_RELAY_SMTP_PORT": str(smtp.port),
        "INVOICE_RELAY_SMTP_SECURITY": "starttls",
        "INVOICE_RELAY_FORWARD_TO": FORWARD_TO,
        "INVOICE_RELAY_FORWARD_FROM": FORWARD_FROM,
        "INVOICE_RELAY_DATABASE_URL": database_url,
        "INVOICE_RELAY_LOG_FORMAT": "json",
    }
    # One bundle for both servers' private CAs: it adds to the system store.
    bundle = Path(str(imap.ca_file) + ".bundle")
    parts = [imap.ca_file.read_bytes()] if imap.ca_file else []
    if smtp_ca is not None:
        parts.append(smtp_ca.ca_file.read_bytes())
    bundle.write_bytes(b"".join(parts))
    env["INVOICE_RELAY_CA_FILE"] = str(bundle)
    env.update(extra)
    return env


def run_relay(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def audit_rows(database_url: str) -> list[dict[str, object]]:
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            result = connection.execute(sa.text("SELECT * FROM audit_log ORDER BY id"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


PDF_1042 = samples.invoice_pdf(number="1042")
PDF_1043 = samples.invoice_pdf(number="1043", amount="12.50")
PDF_1044 = samples.invoice_pdf(number="1044", amount="7.00")
PDF_MUELLER = samples.invoice_pdf(number="1045", amount="310.00", language="de")
PDF_NESTED = samples.invoice_pdf(number="1046", amount="1.00")
PDF_UNNAMED = samples.invoice_pdf(number="1047", amount="2.00")
PDF_ENCRYPTED = samples.encrypted_pdf()
PDF_CUT_SHORT = samples.invoice_pdf(number="2002")


def test_once_forwards_each_distinct_invoice_once(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_url: str
) -> None:
    mails = {
        "first": samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_1042)]),
        "second": samples.invoice_mail(pdfs=[("Invoice 1043.pdf", PDF_1043)]),
        "resend": samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_1042)]),
        "two": samples.invoice_mail(
            pdfs=[("Invoice 1043.pdf", PDF_1043), ("Invoice 1044.pdf", PDF_1044)]
        ),
        "umlaut": samples.invoice_mail(pdfs=[("Rechnung Müller.pdf", PDF_MUELLER)]),
        "octet": samples.invoice_mail(
            pdfs=[("scan.PDF", PDF_ENCRYPTED)], pdf_content_type="application/octet-stream"
        ),
        "nested": samples.forwarded_mail(samples.invoice_mail(pdfs=[("n.pdf", PDF_NESTED)])),
        "unnamed": samples.unnamed_pdf_mail(PDF_UNNAMED),
        "plain": samples.plain_mail(),
        "image": samples.image_only_mail(),
        "mislabelled": samples.mislabelled_mail(),
        "truncated": samples.invoice_mail(pdfs=[("cut.pdf", samples.truncated_pdf())]),
        "corrupt": samples.invoice_mail(pdfs=[("corrupt.pdf", samples.corrupt_pdf())]),
        "base64": samples.broken_base64_mail(samples.invoice_pdf(number="2001")),
        # The closing boundary never comes, but the PDF before it is whole: forward it.
        "boundary": samples.missing_boundary_mail(PDF_CUT_SHORT),
    }
    uids = {name: imap.append(raw) for name, raw in mails.items()}
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)

    first = run_relay(env, "once")
    assert first.returncode == 0, first.stderr

    expected = {
        "Invoice 1042.pdf": PDF_1042,
        "Invoice 1043.pdf": PDF_1043,
        "Invoice 1044.pdf": PDF_1044,
        "Rechnung Müller.pdf": PDF_MUELLER,
        "scan.PDF": PDF_ENCRYPTED,
        "n.pdf": PDF_NESTED,
        "invoice.pdf": PDF_CUT_SHORT,
    }
    received: dict[str, bytes] = {}
    for mail in smtp.messages:
        assert mail.rcpt_tos == (FORWARD_TO,)
        assert mail.message["Auto-Submitted"] == "auto-generated"
        (attachment,) = list(mail.message.iter_attachments())
        assert attachment.get_content_type() == "application/pdf"
        received[str(attachment.get_filename())] = attachment.get_content()
    unnamed = {name: data for name, data in received.items() if data == PDF_UNNAMED}
    assert len(unnamed) == 1  # found by its bytes; named after where it was found
    for name in unnamed:
        del received[name]
    assert received == expected
    assert len(smtp.messages) == len(expected) + 1

    rows = audit_rows(database_url)
    by_uid: dict[int, list[dict[str, object]]] = {}
    for row in rows:
        by_uid.setdefault(int(str(row["uid"])), []).append(row)
    outcomes = {name: [r["outcome"] for r in by_uid[uid]] for name, uid in uids.items()}
    assert outcomes["first"] == ["forwarded"]
    assert outcomes["resend"] == ["duplicate"]
    assert outcomes["two"] == ["duplicate", "forwarded"]
    assert outcomes["plain"] == ["no_pdf"]
    assert outcomes["image"] == ["no_pdf"]
    for name in ("mislabelled", "truncated", "corrupt", "base64"):
        assert outcomes[name] == ["rejected"], name
        assert by_uid[uids[name]][0]["reason"]
    assert "base64" in str(by_uid[uids["base64"]][0]["reason"])
    assert outcomes["boundary"] == ["forwarded"]
    assert outcomes["octet"] == ["forwarded"]  # encrypted, and still forwarded
    assert by_uid[uids["first"]][0]["invoice_number"] == "1042"
    resend_row = by_uid[uids["resend"]][0]
    assert resend_row["duplicate_of"] == by_uid[uids["first"]][0]["id"]
    assert "sha256" in str(resend_row["reason"])
    assert resend_row["forwarded_at"] is None
    forwarded = [r for r in rows if r["outcome"] == "forwarded"]
    assert len(forwarded) == len(smtp.messages)
    assert {r["forwarded_message_id"] for r in forwarded} == {
        str(m.message["Message-ID"]) for m in smtp.messages
    }
    # The mailbox is the durable queue: nothing was flagged, moved or deleted.
    for uid in uids.values():
        assert "\\Seen" not in imap.flags(uid)
    assert imap.uidvalidity() and len(uids) == len(mails)

    again = run_relay(env, "once")
    assert again.returncode == 0, again.stderr
    assert len(smtp.messages) == len(expected) + 1
    assert len(audit_rows(database_url)) == len(rows)


def test_audit_command_formats(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(samples.invoice_mail(pdfs=[("a.pdf", PDF_1042)]))
    imap.append(samples.invoice_mail(pdfs=[("a.pdf", PDF_1042)]))
    imap.append(samples.plain_mail())
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    assert run_relay(env, "once").returncode == 0

    as_json = json.loads(run_relay(env, "audit", "--format", "json").stdout)
    assert sorted(row["outcome"] for row in as_json) == ["duplicate", "forwarded", "no_pdf"]
    assert as_json[0]["invoice_number"] in (None, "1042")

    table = run_relay(env, "audit", "--format", "csv", "--outcome", "duplicate").stdout
    (row,) = list(csv.DictReader(io.StringIO(table)))
    assert row["outcome"] == "duplicate"
    assert row["filename"] == "a.pdf"

    limited = json.loads(run_relay(env, "audit", "--format", "json", "--limit", "1").stdout)
    assert len(limited) == 1
    future = run_relay(env, "audit", "--since", "2999-01-01")
    assert future.returncode == 0
    assert "no rows" in future.stdout

    # `audit` only needs the database; it never migrates or asks for mail settings.
    only_db = {"PATH": env["PATH"], "INVOICE_RELAY_DATABASE_URL": database_url}
    assert run_relay(only_db, "audit").returncode == 0


def test_dry_run_changes_nothing(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database = tmp_path / "relay.db"
    imap.append(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_1042)]))
    imap.append(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF_1042)]))
    env = relay_env(imap, smtp, f"sqlite:///{database}", smtp_ca=smtp_ca)
    result = run_relay(env, "once", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "uid 1 part 2: would forward Invoice 1042.pdf" in result.stdout
    assert "uid 2 part 2: duplicate Invoice 1042.pdf" in result.stdout
    assert "1 PDF(s) would be forwarded" in result.stdout
    assert smtp.messages == []
    assert not database.exists()

    # After a real poll, a dry run knows what was forwarded already.
    assert run_relay(env, "once").returncode == 0
    imap.append(samples.invoice_mail(pdfs=[("again.pdf", PDF_1042)]))
    again = run_relay(env, "once", "--dry-run")
    assert "duplicate again.pdf (same sha256 as a recorded invoice)" in again.stdout
    assert "0 PDF(s) would be forwarded" in again.stdout
    assert len(smtp.messages) == 1


def test_unreachable_imap_exits_1_with_one_line(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}", smtp_ca=smtp_ca)
    imap.stop()
    result = run_relay(env, "once")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("invoice-relay:")]
    assert len(lines) == 1
    assert "IMAP" in lines[0]
    assert "Traceback" not in result.stderr


def test_wrong_password_exits_1_without_the_password(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    secret = "Wr0ng-Pa55word-xyzzy"
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_IMAP_PASSWORD=secret,
    )
    result = run_relay(env, "once")
    assert result.returncode == 1
    assert "login" in result.stderr.lower()
    assert secret not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_utf8_smtp_password_is_sent_or_refused_plainly_and_leaves_no_lease(
    imap: DovecotServer, smtp_ca: TestCA, tmp_path: Path
) -> None:
    # Postfix takes this with AUTH PLAIN; smtplib alone raised UnicodeEncodeError,
    # quoting a character of it, and `run` left the document leased and silent.
    user, password = "relay-user", "pässwörd-€-smtp"
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(samples.invoice_mail(pdfs=[("a.pdf", PDF_1042)]))
    tls_cert = (smtp_ca.cert_file, smtp_ca.key_file)
    credentials = {"INVOICE_RELAY_SMTP_USER": user, "INVOICE_RELAY_SMTP_PASSWORD": password}

    with running_sink(tls_cert=tls_cert, auth=(user, password), auth_excluded=("PLAIN",)) as sink:
        env = relay_env(imap, sink, database_url, smtp_ca=smtp_ca, **credentials)
        refused = run_relay(env, "once")
    assert refused.returncode == 1
    told = refused.stdout + refused.stderr
    assert "Traceback" not in told
    assert "no login that can carry them" in told
    assert {char for char in password if not char.isascii()} & set(told) == set()
    assert [r["outcome"] for r in audit_rows(database_url)] == ["pending"]
    assert [r["attempts"] for r in audit_rows(database_url)] == [0]

    # Not leased: the next run sends it at once, over a server that offers AUTH PLAIN.
    with running_sink(tls_cert=tls_cert, auth=(user, password)) as sink:
        env = relay_env(imap, sink, database_url, smtp_ca=smtp_ca, **credentials)
        sent = run_relay(env, "once")
        assert sent.returncode == 0, sent.stderr
        assert sink.logins == [user]
        assert len(sink.messages) == 1
    assert [r["outcome"] for r in audit_rows(database_url)] == ["forwarded"]


def test_missing_setting_exits_2_naming_it(
    imap: DovecotServer, smtp: SmtpSink, tmp_path: Path
) -> None:
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}")
    del env["INVOICE_RELAY_FORWARD_TO"]
    result = run_relay(env, "once")
    assert result.returncode == 2
    assert "INVOICE_RELAY_FORWARD_TO" in result.stderr
    assert "Traceback" not in result.stderr


def test_smtp_outage_loses_nothing_and_sends_nothing_twice(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    for number in ("1042", "1043", "1044"):
        pdf = samples.invoice_pdf(number=number)
        imap.append(samples.invoice_mail(pdfs=[(f"{number}.pdf", pdf)]))
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    smtp.stop()
    down = run_relay(env, "once")
    assert down.returncode == 1
    assert "SMTP" in down.stderr
    rows = audit_rows(database_url)
    assert [r["outcome"] for r in rows] == ["pending"] * 3
    assert [r["attempts"] for r in rows] == [0, 0, 0]

    smtp.start()
    up = run_relay(env, "once")
    assert up.returncode == 0, up.stderr
    assert len(smtp.messages) == 3
    assert [r["outcome"] for r in audit_rows(database_url)] == ["forwarded"] * 3


def test_permanent_and_temporary_smtp_answers(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(samples.invoice_mail(pdfs=[("a.pdf", PDF_1042)]))
    imap.append(samples.invoice_mail(pdfs=[("b.pdf", PDF_1043)]))
    smtp.fail_next(451, "4.3.0 try again later")
    smtp.fail_next(550, "5.7.1 content rejected")
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca)
    result = run_relay(env, "once")
    assert result.returncode == 0, result.stderr
    rows = {str(r["filename"]): r for r in audit_rows(database_url)}
    outcomes = sorted(str(r["outcome"]) for r in rows.values())
    assert outcomes == ["failed", "pending"]
    failed = next(r for r in rows.values() if r["outcome"] == "failed")
    assert "5.7.1" in str(failed["reason"])


def test_since_leaves_old_mail_alone(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(
        samples.invoice_mail(pdfs=[("old.pdf", PDF_1042)]),
        internaldate=datetime(2024, 1, 5, tzinfo=UTC),
    )
    imap.append(samples.invoice_mail(pdfs=[("new.pdf", PDF_1043)]))
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_SINCE="2025-01-01")
    assert run_relay(env, "once").returncode == 0
    assert [str(r["filename"]) for r in audit_rows(database_url)] == ["new.pdf"]
    assert len(smtp.messages) == 1


def test_private_ca_is_required_for_tls(
    imap: DovecotServer, smtp: SmtpSink, tmp_path: Path
) -> None:
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}")
    del env["INVOICE_RELAY_CA_FILE"]
    result = run_relay(env, "once")
    assert result.returncode == 1
    assert "INVOICE_RELAY_CA_FILE" in result.stderr


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("invoice-relay ")


def test_audit_never_creates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "relay.db"
    env = {"PATH": os.environ.get("PATH", ""), "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{missing}"}
    result = run_relay(env, "audit")
    assert result.returncode == 1
    assert "no database" in result.stderr
    assert not missing.parent.exists()


def test_retry_and_resend_commands(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(samples.invoice_mail(pdfs=[("a.pdf", PDF_1042)]))
    smtp.fail_next(550, "5.7.1 content rejected")
    env = relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, INVOICE_RELAY_KEEP_PDFS="true")
    assert run_relay(env, "once").returncode == 0
    (row,) = audit_rows(database_url)
    assert row["outcome"] == "failed"
    sha256 = str(row["sha256"])

    unknown = run_relay(env, "retry", "0" * 64)
    assert unknown.returncode == 1
    retried = run_relay(env, "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "1 document(s) queued again" in retried.stdout
    assert run_relay(env, "once").returncode == 0
    assert [r["outcome"] for r in audit_rows(database_url)] == ["forwarded"]
    first_id = str(smtp.messages[0].message["Message-ID"])

    resent = run_relay(env, "resend", sha256)
    assert resent.returncode == 0, resent.stderr
    assert run_relay(env, "once").returncode == 0
    assert len(smtp.messages) == 2
    second_id = str(smtp.messages[1].message["Message-ID"])
    assert second_id != first_id  # a deliberate resend is a new mail, recognisably so
    (row,) = audit_rows(database_url)
    assert row["outcome"] == "forwarded"
    assert row["forwarded_message_id"] == second_id
