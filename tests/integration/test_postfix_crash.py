"""The crash points of a send over PIPELINING and CHUNKING (Postfix): the next mail's
envelope is already out when a mail's answer comes back, yet a crash repeats at most
the one mail the server accepted and the database had not marked."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.guarantee_tools import invoices, run_once, run_until_done, tally
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.postfix import POSTFIX, Postfix, running_postfix
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.faults import CRASH_EXIT_STATUS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which(POSTFIX) is None, reason="scripts/lib/setup.sh installs postfix"
    ),
]

MAILS = 6
CRASHES = [("after_send", 3), ("after_mark", 3)]
ALLOWED_DUPLICATES = {"after_send": 1}


@pytest.fixture
def postfix(smtp: SmtpSink) -> Iterator[Postfix]:
    with running_postfix(relay_port=smtp.port) as server:
        yield server


@pytest.mark.parametrize(("point", "nth"), CRASHES)
def test_a_crash_between_two_pipelined_mails_repeats_at_most_one(
    *,
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    postfix: Postfix,
    tmp_path: Path,
    point: str,
    nth: int,
) -> None:
    batch = invoices(MAILS, first=7300)
    imap.append_many(invoice.mail for invoice in batch)
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    env = relay_env(
        imap,
        smtp,
        database_url,
        smtp_ca=smtp_ca,
        INVOICE_RELAY_SMTP_PORT=str(postfix.port),
        INVOICE_RELAY_SMTP_SECURITY="none",
        INVOICE_RELAY_TEST_CRASH_AT=f"{point}:{nth}",
    )
    crashed = run_once(env)
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr[-2000:]
    del env["INVOICE_RELAY_TEST_CRASH_AT"]
    run_until_done(env, database_url)
    postfix.wait_until_relayed()
    result = tally([invoice.sha256 for invoice in batch], smtp.messages, database_url)
    assert (result.lost, result.stuck, result.foreign) == (0, 0, 0)
    assert result.duplicated <= ALLOWED_DUPLICATES.get(point, 0)
    assert result.duplicates_share_message_id
    if point == "after_send":
        assert result.duplicated == 1  # the documented window is real, and one mail wide
    # Every mail went by BDAT: the crash hit a pipelined session.
    assert all("data" not in counts for counts in postfix.session_counts())
