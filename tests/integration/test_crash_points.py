"""A crash injected at each named step of a poll (INVOICE_RELAY_TEST_CRASH_AT), then
`once` until done: the table of lost / duplicated / stuck PDFs per step.

All 0, except `after_send` (the SMTP server accepted, the database does not know yet),
which may repeat exactly that one mail, under the same Message-ID.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.guarantee_tools import (
    Tally,
    invoices,
    run_once,
    run_until_done,
    sql_rows,
    tally,
)
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.faults import CRASH_EXIT_STATUS

MAILS = 7
# (step, which time it is reached): mid-batch for the per-document steps.
CRASHES = [("after_record", 1), ("after_claim", 1), ("after_send", 3), ("after_mark", 3)]
# What each crash may cost at most.
ALLOWED_DUPLICATES = {"after_send": 1}


def test_crash_at_each_step_loses_nothing(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    batch = invoices(MAILS, first=7100)
    imap.append_many(invoice.mail for invoice in batch)
    table: dict[str, Tally] = {}
    for point, nth in CRASHES:
        database_url = f"sqlite:///{tmp_path / f'{point}.db'}"
        env = relay_env(
            imap,
            smtp,
            database_url,
            smtp_ca=smtp_ca,
            INVOICE_RELAY_TEST_CRASH_AT=f"{point}:{nth}",
        )
        before = len(smtp.messages)
        crashed = run_once(env)
        assert crashed.returncode == CRASH_EXIT_STATUS, (point, crashed.stderr[-2000:])
        assert "test_crash" in crashed.stderr
        del env["INVOICE_RELAY_TEST_CRASH_AT"]
        run_until_done(env, database_url)
        received = smtp.messages[before:]
        result = tally([invoice.sha256 for invoice in batch], received, database_url)
        table[point] = result
        assert result.lost == 0, point
        assert result.stuck == 0, point
        assert result.foreign == 0, point
        assert result.duplicated <= ALLOWED_DUPLICATES.get(point, 0), point
        assert result.duplicates_share_message_id, point
        # One mail in, one document and one sighting: a crash never adds a second.
        counts = sql_rows(
            database_url,
            "SELECT (SELECT count(*) FROM documents) AS documents,"
            " (SELECT count(*) FROM sightings) AS sightings",
        )
        assert counts == [{"documents": MAILS, "sightings": MAILS}], point
    print("\ncrash point               (7 invoices; crash once, then `once` until done)")
    for point, nth in CRASHES:
        print(table[point].row(f"{point}:{nth}"))
    # The documented window is real: the crash after acceptance repeats that mail.
    assert table["after_send"].duplicated == 1
