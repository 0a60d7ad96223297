"""The WAN mode of the bench (issue 18): IMAP and SMTP behind a one-way delay (default
25 ms each way), Postfix from Debian as the SMTP server (PIPELINING and CHUNKING; it
discards what it accepts), a backfill by the naive script and by the relay with 1 and
with 4 sessions, in one run (`bench/run --only wan --mails 250`); and the latency
with IDLE over the same link (`bench/run --only wan-latency`).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import corpus
from bench.latency import (
    ACCEPTED,
    EXISTS,
    LatencyRun,
    percentile,
    relay_of,
    run_latency,
    timing_line,
)
from bench.measure import Measured, run_measured
from bench.proxy import delay_proxy
from tests.servers.postfix import Postfix, running_postfix
from tests.servers.smtp_sink import running_sink

if TYPE_CHECKING:  # bench.main imports this module
    from bench.main import Bench


def _env(
    bench: Bench, folder: str, database: Path, imap_port: int, smtp_port: int
) -> dict[str, str]:
    env = bench.env_to("127.0.0.1", smtp_port, folder, database)
    env["INVOICE_RELAY_IMAP_PORT"] = str(imap_port)
    return env


def _delivered(postfix: Postfix, before: int, expected: int) -> int:
    """What Postfix discarded since `before`, once `expected` were (its log lags)."""
    postfix.wait_for_log(r"status=sent", before + expected, timeout=120)
    return postfix.log().count("status=sent") - before


def wan_backfill(
    bench: Bench, count: int, *, delay_ms: float, sessions: Sequence[int] = (1, 4)
) -> None:
    mails = corpus.invoice_mails(count)
    expected = corpus.distinct_pdfs(mails)
    delay = delay_ms / 1000
    bench.say(
        f"## WAN backfill: {count} mails, {expected} distinct PDFs, {delay_ms:g} ms one-way "
        "delay on IMAP and SMTP, Postfix (PIPELINING, CHUNKING)"
    )
    with (
        running_postfix() as postfix,
        delay_proxy(bench.server.host, bench.server.port, delay) as imap,
        delay_proxy("127.0.0.1", postfix.port, delay) as smtp,
    ):
        folder = "Wan-naive"
        bench.fill(folder, mails)
        before = postfix.log().count("status=sent")
        turns = smtp.turns
        naive = run_measured(
            [sys.executable, "-m", "bench.naive_relay"],
            env={
                **_env(bench, folder, bench.scratch / "unused.db", imap.port, smtp.port),
                "NAIVE_DATABASE": str(bench.scratch / "wan-naive.db"),
            },
            log=bench.scratch / "wan-naive.log",
            watch=bench.cpu_watch,
        )
        if naive.status != 0:
            raise RuntimeError(f"the naive script exited {naive.status}:\n{naive.stderr[-2000:]}")
        sent = _delivered(postfix, before, expected)
        naive_turns = (smtp.turns - turns) / max(sent, 1)
        bench.say(
            f"naive baseline           {naive.seconds:8.2f} s   {naive_turns:.1f} SMTP round "
            f"trips per forwarded mail ({sent} forwarded)"
        )
        for number in sessions:
            folder = f"Wan-relay-{number}"
            bench.fill(folder, mails)
            database = bench.scratch / f"wan-{number}.db"
            before = postfix.log().count("status=sent")
            turns = smtp.turns
            env = _env(bench, folder, database, imap.port, smtp.port)
            env["INVOICE_RELAY_SMTP_SESSIONS"] = str(number)
            relay: Measured = bench.once(env, f"wan-{number}")
            sent = _delivered(postfix, before, expected)
            per_mail = (smtp.turns - turns) / max(sent, 1)
            floor = delay * 2 * expected / number
            bench.say(
                f"invoice-relay, {number} session{'s' if number > 1 else ' '}  "
                f"{relay.seconds:8.2f} s   ratio to naive {relay.seconds / naive.seconds:.2f}   "
                f"{per_mail:.2f} SMTP round trips per mail ({sent} forwarded; floor of one "
                f"round trip per mail per session: {floor:.2f} s)"
            )
            if sent != expected:
                raise RuntimeError(f"the relay forwarded {sent}, expected {expected}")


def wan_latency(bench: Bench, count: int, *, delay_ms: float, before: Path | None = None) -> None:
    """IDLE's arrival to forwarded over the delayed link, Postfix relaying to the sink:
    from each APPEND's OK to the mail at the sink, split into the server's announcement
    (EXISTS at the relay), the relay's part (EXISTS to Postfix's acceptance at the relay)
    and Postfix relaying it on; the client turns of that relay's part on each link."""
    mails = corpus.distinct_invoice_mails(count)
    delay = delay_ms / 1000
    bench.say(
        f"## WAN latency with IDLE: {count} mails one at a time, {delay_ms:g} ms one-way "
        "delay on IMAP and SMTP, Postfix (PIPELINING, CHUNKING) relaying to the sink"
    )
    runs: list[tuple[str, LatencyRun]] = []
    with (
        running_sink() as sink,
        running_postfix(relay_port=sink.port) as postfix,
        delay_proxy(bench.server.host, bench.server.port, delay, watch=(EXISTS,)) as imap,
        delay_proxy("127.0.0.1", postfix.port, delay, watch=(ACCEPTED,)) as smtp,
    ):
        for label, checkout in ([("before", before)] if before else []) + [("now", None)]:
            relay = relay_of(bench, checkout)
            folder = f"Wan-live-{label}"
            env = _env(bench, folder, bench.scratch / f"wan-live-{label}.db", imap.port, smtp.port)
            env["INVOICE_RELAY_IDLE"] = "true"
            run = run_latency(
                bench,
                mails,
                name=f"wan-live-{label}",
                env=env,
                relay=relay,
                sink=sink,
                imap_proxy=imap,
                smtp_proxy=smtp,
            )
            runs.append((label, run))
    for label, run in runs:
        relay_part = [a - b for a, b in zip(run.accepted, run.announced, strict=True)]
        onward = [f - a for f, a in zip(run.forwarded, run.accepted, strict=True)]
        p95 = percentile(run.forwarded, 0.95)
        bench.say(
            f"{label}: {run.polls} polls, {run.lent} on the IDLE connection, "
            f"{run.reused} kept SMTP sessions"
        )
        bench.say(
            f"  {timing_line('APPEND OK -> at the sink      ', run.forwarded)}   "
            f"(target p95 < 0.5 s: {'met' if p95 < 0.5 else 'MISSED'})"
        )
        bench.say(f"  {timing_line('APPEND OK -> EXISTS at relay  ', run.announced)}")
        bench.say(f"  {timing_line('EXISTS -> 250 at the relay    ', relay_part)}")
        bench.say(f"  {timing_line('250 -> at the sink (Postfix)  ', onward)}")
        bench.say(
            f"  client turns from EXISTS to 250, per mail: IMAP median "
            f"{statistics.median(run.imap_turns):g} (max {max(run.imap_turns)}), SMTP median "
            f"{statistics.median(run.smtp_turns):g} (max {max(run.smtp_turns)}); first mail "
            f"IMAP {run.imap_turns[0]}, SMTP {run.smtp_turns[0]}"
        )
