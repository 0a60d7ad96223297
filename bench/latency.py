"""Arrival to forwarded with `invoice-relay run` and INVOICE_RELAY_IDLE=true: on
loopback against the sink, and over the WAN link (`bench/wan.py`) against Postfix.

`--before DIR` runs the same measurement, in the same run, with the relay of another
checkout (its `worker` package first on PYTHONPATH; the bench and the servers stay
these), so that a change is compared on one machine under one load.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import corpus
from bench.proxy import DelayProxy
from tests.servers.smtp_sink import SmtpSink, running_sink

if TYPE_CHECKING:
    from bench.main import Bench

FOLDER = "Live"
START_TIMEOUT = 60.0
MAIL_TIMEOUT = 60.0
GAP_SECONDS = 0.2  # between one mail's forwarding and the next one's arrival
EXISTS = b" EXISTS\r\n"  # IDLE's announcement, as it reaches the relay
ACCEPTED = b" queued as "  # Postfix accepting a mail (after DATA or BDAT LAST), at the relay


def _wait_for(log: Path, action: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"action": "{action}"' in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"`invoice-relay run` did not log {action}:\n{log.read_text()[-3000:]}")


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (share 0.95 for p95)."""
    ordered = sorted(values)
    rank = max(1, round(share * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class Relay:
    """How to start the relay: this tree's, or another checkout's."""

    command: tuple[str, ...]
    env: dict[str, str]
    cwd: Path | None = None  # `python -m` puts the working directory first on sys.path


def relay_of(bench: Bench, checkout: Path | None) -> Relay:
    if checkout is None:
        return Relay(command=bench.relay, env={})
    where = checkout.resolve()
    return Relay(
        command=(sys.executable, "-m", "worker"), env={"PYTHONPATH": str(where)}, cwd=where
    )


@dataclass(slots=True)
class LatencyRun:
    """One service run, mail after mail; seconds from each APPEND's OK."""

    forwarded: list[float] = field(default_factory=list)  # to the mail's arrival at the sink
    announced: list[float] = field(default_factory=list)  # to IDLE's EXISTS at the relay
    accepted: list[float] = field(default_factory=list)  # to the server's 250 at the relay
    imap_turns: list[int] = field(default_factory=list)  # announcement to acceptance
    smtp_turns: list[int] = field(default_factory=list)
    polls: int = 0
    lent: int = 0  # polls that read on the IDLE connection
    reused: int = 0  # sends over an SMTP session kept from before


def run_latency(
    bench: Bench,
    mails: Sequence[bytes],
    *,
    name: str,
    env: dict[str, str],
    relay: Relay,
    sink: SmtpSink,
    imap_proxy: DelayProxy | None = None,
    smtp_proxy: DelayProxy | None = None,
) -> LatencyRun:
    """`run` with IDLE on `env`'s folder (created here, empty); each mail APPENDed once
    the one before reached `sink`, `GAP_SECONDS` later."""
    folder = env["INVOICE_RELAY_IMAP_FOLDER"]
    bench.server.create_folder(folder)
    log = bench.scratch / f"{name}.log"
    result = LatencyRun()
    already = len(sink.messages)
    with log.open("wb") as stderr:
        service = subprocess.Popen(
            [*relay.command, "run"],
            env={**env, **relay.env},
            cwd=relay.cwd,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        _wait_for(log, "poll_finished", START_TIMEOUT)
        _wait_for(log, "idle_watching", START_TIMEOUT)
        with bench.server.session() as client:
            for index, raw in enumerate(mails):
                client.append(f'"{folder}"', None, None, raw)
                appended = time.monotonic()
                deadline = appended + MAIL_TIMEOUT
                while len(sink.messages) <= already + index:
                    if time.monotonic() > deadline or service.poll() is not None:
                        raise RuntimeError(
                            f"{name}: mail {index} not forwarded within {MAIL_TIMEOUT} s:\n"
                            + log.read_text(errors="replace")[-3000:]
                        )
                    time.sleep(0.002)
                result.forwarded.append(time.monotonic() - appended)
                if imap_proxy is not None and smtp_proxy is not None:
                    _decompose(result, appended, imap_proxy, smtp_proxy)
                time.sleep(GAP_SECONDS)
    finally:
        os.kill(service.pid, signal.SIGTERM)
        service.wait(timeout=30)
    logged = log.read_text(errors="replace")
    result.polls = logged.count('"action": "poll_finished"')
    result.lent = logged.count('"action": "idle_connection_lent"')
    result.reused = logged.count('"action": "smtp_reused"')
    return result


def _decompose(
    result: LatencyRun, appended: float, imap_proxy: DelayProxy, smtp_proxy: DelayProxy
) -> None:
    # Postfix may relay the mail to the sink before its 250 has crossed the link back.
    deadline = time.monotonic() + 5
    while True:
        announced = imap_proxy.first_seen(EXISTS, appended)
        accepted = smtp_proxy.first_seen(ACCEPTED, appended)
        if announced is not None and accepted is not None and time.monotonic() >= accepted:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not seen at the proxies: announcement {announced}, acceptance {accepted}"
            )
        time.sleep(0.01)
    result.announced.append(announced - appended)
    result.accepted.append(accepted - appended)
    result.imap_turns.append(imap_proxy.turns_between(announced, accepted))
    result.smtp_turns.append(smtp_proxy.turns_between(announced, accepted))


def timing_line(label: str, values: Sequence[float]) -> str:
    return (
        f"{label}  p50 {statistics.median(values):.3f} s   p95 {percentile(values, 0.95):.3f} s"
        f"   max {max(values):.3f} s"
    )


def measure_latency(bench: Bench, count: int, *, before: Path | None = None) -> None:
    """On loopback against the sink; with `before`, that checkout's relay first."""
    mails = corpus.distinct_invoice_mails(count)
    bench.say(
        f"## latency with IDLE (`run`, INVOICE_RELAY_IDLE=true), {count} mails, one at a time"
    )
    for label, checkout in ([("before", before)] if before else []) + [("now", None)]:
        relay = relay_of(bench, checkout)
        with running_sink() as sink:
            folder = f"{FOLDER}-{label}"
            env = bench.env(
                sink, folder, bench.scratch / f"latency-{label}.db", INVOICE_RELAY_IDLE="true"
            )
            run = run_latency(
                bench, mails, name=f"latency-{label}", env=env, relay=relay, sink=sink
            )
        p95 = percentile(run.forwarded, 0.95)
        what = f"{label:<6} " if before else ""
        bench.say(
            f"{what}{timing_line('arrival -> forwarded ', run.forwarded)}   ({run.polls} polls, "
            f"{run.lent} on the IDLE connection, {run.reused} kept SMTP sessions; "
            f"target p95 <= 2 s: {'met' if p95 <= 2 else 'MISSED'})"
        )
