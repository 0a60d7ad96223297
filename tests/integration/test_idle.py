"""IMAP IDLE against a real Dovecot: the adapter's IDLE calls, and `invoice-relay run`
with INVOICE_RELAY_IDLE=true forwarding a mail within seconds of its arrival."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import samples
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.config.environment import Secret
from worker.imap.mailbox import ImapMailbox
from worker.models import FolderStatus, PasswordCredentials, Security
from worker.service.idle import IdleTiming, IdleWatcher

pytestmark = pytest.mark.integration

# The schedule fires once a year: whatever is forwarded within seconds came through IDLE.
YEARLY = "0 0 1 1 *"


def _mailbox(imap: DovecotServer) -> ImapMailbox:
    return ImapMailbox(
        host=imap.host,
        port=imap.port,
        security=Security.NONE,
        credentials=PasswordCredentials(user=imap.user, password=Secret(imap.password)),
        timeout=10.0,
    )


def _invoice_mail(number: int) -> bytes:
    return samples.invoice_mail(
        pdfs=[(f"Invoice-{number}.pdf", samples.invoice_pdf(number=str(number)))],
        subject=f"Invoice {number}",
        message_id=f"<idle-{number}@shop.example>",
    )


def test_idle_announces_a_mail_appended_by_someone_else(imap: DovecotServer) -> None:
    mailbox = _mailbox(imap)
    mailbox.open()
    try:
        assert mailbox.supports_idle()
        mailbox.idle_start()
        assert mailbox.idle_wait(0.3) is False  # nothing yet (a quiet wait is no drop)
        imap.append(samples.plain_mail())
        deadline = time.monotonic() + 5
        announced = False
        while not announced and time.monotonic() < deadline:
            announced = mailbox.idle_wait(0.5)
        mailbox.idle_done()
    finally:
        mailbox.close()

    assert announced


class _SignallingMailbox(ImapMailbox):
    """Says when the server has accepted IDLE on the current connection, so a test
    appends mail only then."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.idling = threading.Event()

    def open(self) -> FolderStatus:
        self.idling.clear()  # a new connection: not idling on it yet
        return super().open()

    def idle_start(self) -> None:
        super().idle_start()  # returns once the server answered "+ idling"
        self.idling.set()


def test_the_watcher_calls_back_and_reconnects_after_the_server_restarts(
    imap: DovecotServer,
) -> None:
    stop = threading.Event()
    announcements = threading.Semaphore(0)
    mailbox = _SignallingMailbox(
        host=imap.host,
        port=imap.port,
        security=Security.NONE,
        credentials=PasswordCredentials(user=imap.user, password=Secret(imap.password)),
        timeout=10.0,
    )
    watcher = IdleWatcher(
        mailbox=mailbox,
        on_new_mail=announcements.release,
        stop=stop,
        timing=IdleTiming(check_seconds=0.2, first_backoff_seconds=0.2),
    )
    thread = watcher.start()
    try:
        assert mailbox.idling.wait(10)
        imap.append(samples.plain_mail())
        assert announcements.acquire(timeout=5)

        imap.stop()  # the connection drops; the watcher retries with backoff
        imap.start()
        # Back in: one poll for whatever came while it was away, then announcements.
        assert announcements.acquire(timeout=10)
        assert mailbox.idling.wait(10)
        imap.append(samples.plain_mail())
        assert announcements.acquire(timeout=5)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_run_with_idle_forwards_new_mail_within_seconds(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_IDLE="true",
        INVOICE_RELAY_SCHEDULE=YEARLY,
        INVOICE_RELAY_HTTP_PORT="0",
    )
    log = tmp_path / "run.log"
    with log.open("wb") as stderr:
        service = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=stderr, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 30
        while '"action": "idle_watching"' not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            assert service.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)
        latencies = []
        for number in (7301, 7302):
            imap.append(_invoice_mail(number))
            arrived = time.monotonic()
            while not any(f"Invoice-{number}.pdf".encode() in m.raw for m in smtp.messages):
                assert time.monotonic() - arrived < 15, log.read_text()[-2000:]
                time.sleep(0.02)
            latencies.append(time.monotonic() - arrived)
    finally:
        os.kill(service.pid, signal.SIGTERM)
        status = service.wait(timeout=20)

    print(f"\nIDLE: forwarded {', '.join(f'{s:.2f}' for s in latencies)} s after arrival")
    assert status == 0
    assert len(smtp.messages) == 2
    # "within a couple of seconds": generous for a loaded test machine, far below the
    # schedule (a year) that would otherwise be the only way in.
    assert max(latencies) < 5, latencies
