"""`invoice-relay run` as a user runs it: a subprocess against Dovecot, the SMTP sink and
SQLite, watched through its HTTP endpoints and stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests import samples
from tests.integration.test_relay import FORWARD_TO, relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink
from tests.servers.stall_proxy import running_proxy
from tests.servers.tls import TestCA

STOP_BOUND = 10.0  # seconds from SIGTERM to exit that the issue promises

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, why) when nothing answers yet."""
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def samples_of(text: str) -> dict[str, float]:
    """Prometheus text to {'name{label="value"}': value}."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


@dataclass
class Relay:
    process: subprocess.Popen[bytes]
    port: int
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the relay exited ({self.process.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; log:\n{self.log()}")
            time.sleep(0.1)

    def terminate(self) -> int:
        """SIGTERM, then the exit status; fails when it takes longer than promised."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within {STOP_BOUND} s of SIGTERM") from None


@contextmanager
def running_relay(env: Mapping[str, str], log_file: Path, port: int) -> Iterator[Relay]:
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    relay = Relay(process=process, port=port, log_file=log_file)
    try:
        yield relay
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_run_polls_at_start_up_serves_health_and_metrics_and_stops_on_sigterm(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    imap.append(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", samples.invoice_pdf())]))
    port = free_port()
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        # Once a year: any poll seen now is the start-up poll.
        INVOICE_RELAY_SCHEDULE="0 0 1 1 *",
        INVOICE_RELAY_HTTP_PORT=str(port),
    )
    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(lambda: len(smtp.messages) == 1, 30, "the start-up poll's forward")
        assert smtp.messages[0].rcpt_tos == (FORWARD_TO,)
        relay.wait_until(lambda: get(port, "/healthz")[0] == 200, 10, "/healthz 200")

        assert get(port, "/livez") == (200, "ok\n")
        body = json.loads(get(port, "/healthz")[1])
        assert body["status"] == "ok"
        assert (body["pending"], body["failed"], body["last_error"]) == (0, 0, None)
        status, text = get(port, "/metrics")
        assert status == 200
        metrics = samples_of(text)
        assert metrics['invoice_relay_polls_total{result="ok",route="default"}'] == 1
        assert metrics['invoice_relay_polls_total{result="error",route="default"}'] == 0
        assert metrics['invoice_relay_pdfs_total{outcome="pending",route="default"}'] == 1
        assert metrics['invoice_relay_poll_duration_seconds_count{route="default"}'] == 1
        assert (
            metrics['invoice_relay_last_success_timestamp_seconds{route="default"}']
            > time.time() - 60
        )
        assert metrics['invoice_relay_pending_forwards{route="default"}'] == 0
        assert imap.password not in text

        probe = subprocess.run(
            [sys.executable, "-m", "worker", "healthcheck", "--ready"],
            env={"PATH": env["PATH"], "INVOICE_RELAY_HTTP_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert json.loads(probe.stdout)["status"] == "ok"

        assert relay.terminate() == 0
    log = relay.log()
    assert imap.password not in log
    actions = [json.loads(line).get("action") for line in log.splitlines() if line.startswith("{")]
    assert "service_stopping" in actions
    assert "service_stopped" in actions


def test_run_forwards_later_mail_on_schedule_and_turns_unready_when_imap_stops(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    port = free_port()
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_SCHEDULE="2s",
        # Shorter than the defaults (three intervals plus a minute; 60 s waits) so that
        # /healthz turning 503 and back is seen within the test; what is checked is the
        # turn itself, which the defaults only delay.
        INVOICE_RELAY_HEALTHY_AFTER="5s",
        INVOICE_RELAY_HTTP_PORT=str(port),
        INVOICE_RELAY_TIMEOUT="5",
    )

    def polls(result: str) -> float:
        status, text = get(port, "/metrics")
        if status != 200:
            return 0.0  # not listening yet
        return samples_of(text)[f'invoice_relay_polls_total{{result="{result}",route="default"}}']

    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(lambda: polls("ok") >= 1, 30, "the start-up poll")
        assert smtp.messages == []  # an empty mailbox

        imap.append(samples.invoice_mail(pdfs=[("Invoice 1043.pdf", samples.invoice_pdf())]))
        relay.wait_until(lambda: len(smtp.messages) == 1, 30, "a scheduled poll's forward")
        # The sink has the mail before that poll has marked it and counted itself.
        relay.wait_until(lambda: polls("ok") >= 2, 30, "the scheduled poll counted as ok")

        imap.stop()
        relay.wait_until(lambda: polls("error") >= 1, 30, "a failed poll")
        relay.wait_until(lambda: get(port, "/healthz")[0] == 503, 30, "/healthz 503")
        body = json.loads(get(port, "/healthz")[1])
        assert body["status"] == "stale"
        assert "IMAP" in str(body["last_error"])
        assert get(port, "/livez") == (200, "ok\n")  # an IMAP outage is no reason to restart

        assert relay.terminate() == 0
    assert len(smtp.messages) == 1


def test_sigterm_while_waiting_for_the_database_exits_0(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens: the database stays unavailable
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "INVOICE_RELAY_IMAP_HOST": "127.0.0.1",
        "INVOICE_RELAY_IMAP_USER": "someone",
        "INVOICE_RELAY_IMAP_PASSWORD": "not-used-here",
        "INVOICE_RELAY_SMTP_HOST": "127.0.0.1",
        "INVOICE_RELAY_FORWARD_TO": FORWARD_TO,
        "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
        "INVOICE_RELAY_DATABASE_URL": f"postgresql://relay@127.0.0.1:{closed}/relay",
        "INVOICE_RELAY_HTTP_PORT": "0",
        "INVOICE_RELAY_LOG_FORMAT": "json",
    }
    with running_relay(env, tmp_path / "run.log", 0) as relay:
        relay.wait_until(
            lambda: "database_unavailable" in relay.log(), 30, "the wait for the database"
        )
        assert relay.terminate() == 0
    assert "Traceback" not in relay.log()


def test_run_started_without_its_database_polls_and_forwards_once_it_is_reachable(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    imap.append(samples.invoice_mail(pdfs=[("Invoice 1044.pdf", samples.invoice_pdf())]))
    port = free_port()
    database_port = free_port()  # nothing listens there until a proxy below does
    with temporary_database() as database_url:
        assert ":5432/" in database_url
        env = relay_env(
            imap,
            smtp,
            database_url.replace(":5432/", f":{database_port}/"),
            smtp_ca=smtp_ca,
            INVOICE_RELAY_SCHEDULE="2s",
            INVOICE_RELAY_HTTP_PORT=str(port),
            # A poll on a cut database fails within this instead of the 60 s default; the
            # recovery without a restart is the same either way.
            INVOICE_RELAY_TIMEOUT="5",
        )

        def polls(result: str) -> float:
            status, text = get(port, "/metrics")
            if status != 200:
                return 0.0  # not listening yet
            return samples_of(text)[
                f'invoice_relay_polls_total{{result="{result}",route="default"}}'
            ]

        with running_relay(env, tmp_path / "run.log", port) as relay:
            relay.wait_until(
                lambda: relay.log().count("database_unavailable") >= 2,
                30,
                "two failed tries to reach the database at start-up",
            )
            assert smtp.messages == []
            # The database becomes reachable at the address the relay was given.
            with running_proxy(5432, listen_port=database_port):
                reachable = time.monotonic()
                relay.wait_until(lambda: len(smtp.messages) == 1, 90, "the first forward")
                first_forward = time.monotonic() - reachable
                relay.wait_until(lambda: get(port, "/healthz")[0] == 200, 30, "/healthz 200")
            # Gone again while the service runs (every connection cut), and back.
            imap.append(
                samples.invoice_mail(
                    pdfs=[("Invoice 1045.pdf", samples.invoice_pdf(number="1045"))]
                )
            )
            relay.wait_until(lambda: polls("error") >= 1, 60, "a poll failing on the database")
            assert len(smtp.messages) == 1
            with running_proxy(5432, listen_port=database_port):
                back = time.monotonic()
                relay.wait_until(lambda: len(smtp.messages) == 2, 60, "the forward after it")
                print(
                    f"\nrun without its database: forwarded {first_forward:.1f}s after it "
                    f"became reachable; lost and back: {time.monotonic() - back:.1f}s"
                )
                assert relay.process.poll() is None  # the same process: never restarted
                assert relay.terminate() == 0
    assert [m.rcpt_tos for m in smtp.messages] == [(FORWARD_TO,), (FORWARD_TO,)]
    assert "Traceback" not in relay.log()
