"""IMAP IDLE against a real Dovecot: the adapter's IDLE calls, and `invoice-relay run`
with INVOICE_RELAY_IDLE=true forwarding a mail within seconds of its arrival: read on
the IDLE connection, sent over an SMTP session kept between mails (Postfix, the sink),
once, with another poll racing it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import samples
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.postfix import running_postfix
from tests.servers.smtp_sink import SmtpSink, running_sink
from tests.servers.stall_proxy import Fault, running_proxy
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


# --- read on the IDLE connection, sent over a kept SMTP session ------------------------


def _plain_env(imap: DovecotServer, sink: SmtpSink, tmp_path: Path, **extra: str) -> dict[str, str]:
    """`run` with IDLE over plain IMAP and SMTP (a proxy can read them), a yearly
    schedule (whatever is forwarded within seconds came through IDLE)."""
    env = relay_env(imap, sink, f"sqlite:///{tmp_path / 'relay.db'}")
    env.update(
        INVOICE_RELAY_IMAP_HOST=imap.host,
        INVOICE_RELAY_IMAP_PORT=str(imap.port),
        INVOICE_RELAY_IMAP_SECURITY="none",
        INVOICE_RELAY_SMTP_HOST="127.0.0.1",
        INVOICE_RELAY_SMTP_SECURITY="none",
        INVOICE_RELAY_IDLE="true",
        INVOICE_RELAY_SCHEDULE=YEARLY,
        INVOICE_RELAY_HTTP_PORT="0",
    )
    env.update(extra)
    return env


def _logged(log: Path, action: str) -> int:
    return log.read_text(errors="replace").count(f'"action": "{action}"')


@contextmanager
def _service(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`invoice-relay run`, watching (IDLE) once this yields; stopped with SIGTERM after,
    and its exit status checked."""
    with log.open("wb") as stderr:
        service = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=stderr, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 30
        while not (_logged(log, "idle_watching") and _logged(log, "poll_finished")):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert service.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        yield service
    finally:
        if service.poll() is None:
            os.kill(service.pid, signal.SIGTERM)
        status = service.wait(timeout=30)
    assert status == 0, log.read_text()[-3000:]


def _wait_forwarded(sink: SmtpSink, number: int, log: Path, *, count: int = 1) -> None:
    deadline = time.monotonic() + 20
    name = f"Invoice-{number}.pdf".encode()
    while sum(name in mail.raw for mail in sink.messages) < count:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


def test_announced_mails_are_read_on_the_idle_connection_and_share_one_smtp_session(
    imap: DovecotServer, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    with running_sink() as sink, running_postfix(relay_port=sink.port) as postfix:
        env = _plain_env(imap, sink, tmp_path, INVOICE_RELAY_SMTP_PORT=str(postfix.port))
        with _service(env, log):
            for number in (7311, 7312):
                imap.append(_invoice_mail(number))
                _wait_forwarded(sink, number, log)
        # SIGTERM QUITs the kept session: Postfix logs its commands then.
        postfix.wait_for_log(r" disconnect from .* mail=")
        sessions = [counts for counts in postfix.session_counts() if "mail" in counts]

    # One SMTP session for both mails; the second went out after a NOOP found it alive.
    assert len(sessions) == 1, sessions
    (session,) = sessions
    assert session["mail"] == session["rcpt"] == session["bdat"] == 2
    assert session["noop"] == 1
    assert session["quit"] == 1
    assert _logged(log, "smtp_opened") == 1
    assert _logged(log, "smtp_reused") == 1
    # Each announced mail was read on the watcher's connection, no other one opened.
    assert _logged(log, "idle_connection_lent") == 2
    assert _logged(log, "poll_finished") == 3  # the start-up poll and one per mail
    assert len(sink.messages) == 2


def test_a_kept_smtp_session_the_server_dropped_is_opened_anew(
    imap: DovecotServer, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    with running_sink() as sink, running_proxy(sink.port) as proxy:
        # The kept session's line is cut as the NOOP before its reuse goes out: to the
        # relay, a session the server dropped while it was kept.
        proxy.add_fault(Fault(direction="to_server", action="drop", after_pattern=b"NOOP"))
        env = _plain_env(imap, sink, tmp_path, INVOICE_RELAY_SMTP_PORT=str(proxy.port))
        with _service(env, log):
            imap.append(_invoice_mail(7321))
            _wait_forwarded(sink, 7321, log)
            imap.append(_invoice_mail(7322))
            _wait_forwarded(sink, 7322, log)
        assert proxy.tripped.is_set()
        assert proxy.connections == 2

    assert _logged(log, "smtp_reopened") == 1
    assert _logged(log, "smtp_reused") == 0
    assert _logged(log, "smtp_opened") == 2
    # Nothing was lost or sent twice: the dead session carried no part of the second mail.
    assert sorted(
        number
        for mail in sink.messages
        for number in (7321, 7322)
        if f"Invoice-{number}.pdf".encode() in mail.raw
    ) == [7321, 7322]
    assert _logged(log, "pdf_forwarded") == 2


def test_a_poll_racing_the_idle_read_forwards_nothing_twice(
    imap: DovecotServer, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    with running_sink() as sink, running_proxy(imap.port) as imap_proxy:
        # The service's IMAP goes through the proxy; its read on the IDLE connection is
        # held at UID SEARCH, inside its poll lease. (The start-up poll of an empty
        # folder sends no SEARCH: the fault is for the watcher's connection.)
        imap_proxy.add_fault(
            Fault(direction="to_server", action="hold", after_pattern=b"UID SEARCH", connections=2)
        )
        direct = _plain_env(imap, sink, tmp_path, INVOICE_RELAY_SMTP_PORT=str(sink.port))
        env = {**direct, "INVOICE_RELAY_IMAP_PORT": str(imap_proxy.port)}
        with _service(env, log):
            imap.append(_invoice_mail(7331))
            assert imap_proxy.tripped.wait(20), log.read_text()[-3000:]
            # Another replica polls while the service reads the announced mail.
            racing = run_relay(direct, "once")
            assert racing.returncode == 0, racing.stderr[-2000:]
            assert '"action": "poll_locked"' in racing.stderr
            imap_proxy.release()
            _wait_forwarded(sink, 7331, log)
            # Once the service is done, the other replica finds nothing left to send.
            deadline = time.monotonic() + 20
            while not _logged(log, "poll_finished") >= 2:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            again = run_relay(direct, "once")
            assert again.returncode == 0, again.stderr[-2000:]
            # And the watcher is back in IDLE: the next mail comes through it too.
            imap.append(_invoice_mail(7332))
            _wait_forwarded(sink, 7332, log)

    assert '"action": "pdf_forwarded"' not in racing.stderr + again.stderr
    assert _logged(log, "idle_connection_lent") == 2
    for number in (7331, 7332):
        copies = [mail for mail in sink.messages if f"Invoice-{number}.pdf".encode() in mail.raw]
        assert len(copies) == 1, number
    assert len(sink.messages) == 2
