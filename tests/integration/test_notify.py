"""Failure notices end to end: `invoice-relay once` against Dovecot, the sink and SQLite
with INVOICE_RELAY_NOTIFY_TO set."""

from __future__ import annotations

import time
from pathlib import Path

from tests import samples
from tests.integration.test_relay import FORWARD_TO, audit_rows, relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import ReceivedMail, SmtpSink
from tests.servers.tls import TestCA
from worker.delivery.message import NOTICE_HEADER
from worker.mail.verdicts import NOTICE_LOOP_REASON

NOTIFY_TO = "owner@shop.example"


def notices(smtp: SmtpSink) -> list[ReceivedMail]:
    return [mail for mail in smtp.messages if mail.rcpt_tos == (NOTIFY_TO,)]


def test_one_notice_per_interval_never_the_same_rows_and_a_returning_notice_is_a_loop(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    imap.append(samples.invoice_mail(pdfs=[("good.pdf", samples.invoice_pdf())]))
    imap.append(samples.invoice_mail(pdfs=[("corrupt.pdf", samples.corrupt_pdf())]))
    env = relay_env(
        imap,
        smtp,
        database_url,
        smtp_ca=smtp_ca,
        INVOICE_RELAY_NOTIFY_TO=NOTIFY_TO,
        INVOICE_RELAY_NOTIFY_INTERVAL="1s",
    )

    first = run_relay(env, "once")
    assert first.returncode == 0, first.stderr
    (notice,) = notices(smtp)
    assert [mail.rcpt_tos for mail in smtp.messages].count((FORWARD_TO,)) == 1
    assert notice.message["Auto-Submitted"] == "auto-generated"
    assert notice.message[NOTICE_HEADER]
    assert list(notice.message.iter_attachments()) == []
    corrupt_id = next(row["id"] for row in audit_rows(database_url) if row["outcome"] == "rejected")
    body = notice.message.get_content()
    assert f"{corrupt_id:>8}  rejected   corrupt.pdf:" in body
    assert imap.password not in body

    time.sleep(1.1)  # the interval is over; nothing new happened
    assert run_relay(env, "once").returncode == 0
    assert len(notices(smtp)) == 1

    # The notice lands in the polled mailbox, next to a new bad mail.
    imap.append(notice.raw)
    imap.append(samples.invoice_mail(pdfs=[("cut.pdf", samples.truncated_pdf())]))
    time.sleep(1.1)
    assert run_relay(env, "once").returncode == 0
    rows = audit_rows(database_url)
    looped = [row for row in rows if row["reason"] == NOTICE_LOOP_REASON]
    assert len(looped) == 1
    cut = next(row for row in rows if row["filename"] == "cut.pdf")
    _, second_notice = notices(smtp)
    second_body = second_notice.message.get_content()
    assert f"{cut['id']:>8}  rejected   cut.pdf:" in second_body
    assert f"{corrupt_id:>8}  " not in second_body  # never the same rows twice
    assert f"{looped[0]['id']:>8}  " not in second_body  # its own notice is no news
    assert [mail.rcpt_tos for mail in smtp.messages].count((FORWARD_TO,)) == 1
