"""Arrival to forwarded with `invoice-relay run` and INVOICE_RELAY_IDLE=true."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import corpus
from tests.servers.smtp_sink import running_sink

if TYPE_CHECKING:
    from bench.main import Bench

FOLDER = "Live"
START_TIMEOUT = 60.0
MAIL_TIMEOUT = 60.0
GAP_SECONDS = 0.2  # between one mail's forwarding and the next one's arrival


def _wait_for(log: Path, action: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"action": "{action}"' in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"`invoice-relay run` did not log {action}:\n{log.read_text()[-3000:]}")


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (share 0.95 for p95)."""
    ordered = sorted(values)
    rank = max(1, round(share * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def measure_latency(bench: Bench, count: int) -> None:
    mails = corpus.distinct_invoice_mails(count)
    bench.server.create_folder(FOLDER)
    log = bench.scratch / "run.log"
    latencies: list[float] = []
    with running_sink() as sink, log.open("wb") as stderr:
        env = bench.env(sink, FOLDER, bench.scratch / "latency.db", INVOICE_RELAY_IDLE="true")
        service = subprocess.Popen([*bench.relay, "run"], env=env, stdout=stderr, stderr=stderr)
        try:
            _wait_for(log, "poll_finished", START_TIMEOUT)
            _wait_for(log, "idle_watching", START_TIMEOUT)
            with bench.server.session() as client:
                for index, raw in enumerate(mails):
                    client.append(f'"{FOLDER}"', None, None, raw)
                    arrived = time.perf_counter()
                    deadline = time.monotonic() + MAIL_TIMEOUT
                    while len(sink.messages) <= index:
                        if time.monotonic() > deadline:
                            raise RuntimeError(
                                f"mail {index} not forwarded within {MAIL_TIMEOUT} s"
                            )
                        time.sleep(0.002)
                    latencies.append(time.perf_counter() - arrived)
                    time.sleep(GAP_SECONDS)
        finally:
            os.kill(service.pid, signal.SIGTERM)
            service.wait(timeout=30)
    polls = log.read_text(errors="replace").count('"action": "poll_finished"')
    p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    bench.say(
        f"## latency with IDLE (`run`, INVOICE_RELAY_IDLE=true), {count} mails, one at a time"
    )
    bench.say(
        f"arrival -> forwarded    p50 {p50:.3f} s   p95 {p95:.3f} s   max {max(latencies):.3f} s"
        f"   ({polls} polls; target p95 <= 2 s: {'met' if p95 <= 2 else 'MISSED'})"
    )
