"""The benchmark of issue 7, in one run: backfill, idle polls, memory, IDLE latency.

`bench/run` is the command (it installs what is missing first); this module does the
work: `python -m bench.main [--mails N] [--quick]`. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import corpus, maildir
from bench.latency import measure_latency
from bench.measure import Measured, bench_process_cpu_seconds, run_measured, server_cpu
from bench.proxy import counting_proxy
from bench.wan import wan_backfill, wan_latency
from tests.servers.dovecot import DovecotServer, running_dovecot
from tests.servers.smtp_sink import SmtpSink, running_sink

FORWARD_TO = "inbox-4711@getmyinvoices.example"
FORWARD_FROM = "relay@shop.example"
RELAY = (sys.executable, "-m", "worker")


@dataclass(slots=True)
class Bench:
    """The servers and the scratch directory of one benchmark run."""

    server: DovecotServer
    scratch: Path
    lines: list[str] = field(default_factory=list)
    relay: tuple[str, ...] = RELAY
    cpu_watch: dict[str, Callable[[], float]] = field(default_factory=dict)

    def env(self, sink: SmtpSink, folder: str, database: Path, **extra: str) -> dict[str, str]:
        return self.env_to(sink.host, sink.port, folder, database, **extra)

    def env_to(
        self, smtp_host: str, smtp_port: int, folder: str, database: Path, **extra: str
    ) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.scratch),
            "INVOICE_RELAY_IMAP_HOST": self.server.host,
            "INVOICE_RELAY_IMAP_PORT": str(self.server.port),
            "INVOICE_RELAY_IMAP_SECURITY": "none",
            "INVOICE_RELAY_IMAP_USER": self.server.user,
            "INVOICE_RELAY_IMAP_PASSWORD": self.server.password,
            "INVOICE_RELAY_IMAP_FOLDER": folder,
            "INVOICE_RELAY_SMTP_HOST": smtp_host,
            "INVOICE_RELAY_SMTP_PORT": str(smtp_port),
            "INVOICE_RELAY_SMTP_SECURITY": "none",
            "INVOICE_RELAY_FORWARD_TO": FORWARD_TO,
            "INVOICE_RELAY_FORWARD_FROM": FORWARD_FROM,
            "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{database}",
            "INVOICE_RELAY_LOG_FORMAT": "json",
            "INVOICE_RELAY_HTTP_PORT": "0",
        }
        env.update(extra)
        return env

    def once(self, env: dict[str, str], name: str) -> Measured:
        result = run_measured(
            [*self.relay, "once"],
            env=env,
            log=self.scratch / f"{name}.log",
            watch=self.cpu_watch,
        )
        if result.status != 0:
            raise RuntimeError(
                f"`invoice-relay once` ({name}) exited {result.status}:\n" + result.stderr[-3000:]
            )
        return result

    def fill(self, folder: str, mails: Sequence[bytes]) -> None:
        maildir.write_mails(self.server, folder, mails)
        # Dovecot indexes the new files here, so no measured client pays for it.
        with self.server.session() as client:
            client.status(f'"{folder}"', "(MESSAGES UIDNEXT)")

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillRun:
    """One side-by-side round: the naive script and the relay on fresh folders."""

    naive: Measured
    relay: Measured
    floor: float

    @property
    def ratio(self) -> float:
        return self.relay.seconds / self.naive.seconds if self.naive.seconds else float("nan")


def _backfill_round(
    bench: Bench, mails: Sequence[bytes], expected: int, index: int, *, naive_first: bool
) -> BackfillRun:
    """Naive and relay, each on its own fresh folder, database and sink; the order of
    the two alternates between rounds so neither always meets the warmer disk."""
    naive_folder, relay_folder = f"Backfill-naive-{index}", f"Backfill-relay-{index}"
    bench.fill(naive_folder, mails)
    bench.fill(relay_folder, mails)

    def run_naive() -> tuple[Measured, int]:
        with running_sink() as sink:
            env = bench.env(
                sink,
                naive_folder,
                bench.scratch / "unused.db",
                NAIVE_DATABASE=str(bench.scratch / f"naive-{index}.db"),
            )
            measured = run_measured(
                [sys.executable, "-m", "bench.naive_relay"],
                env=env,
                log=bench.scratch / f"naive-{index}.log",
                watch=bench.cpu_watch,
            )
            return measured, len(sink.messages)

    def run_relay() -> tuple[Measured, list[bytes]]:
        # The last round's database stays as backfill.db: the idle polls start from it.
        database = bench.scratch / "backfill.db"
        database.unlink(missing_ok=True)
        with running_sink() as sink:
            measured = bench.once(bench.env(sink, relay_folder, database), f"backfill-{index}")
            return measured, [mail.raw for mail in sink.messages]

    if naive_first:
        naive, naive_sent = run_naive()
        relay, forwarded = run_relay()
    else:
        relay, forwarded = run_relay()
        naive, naive_sent = run_naive()
    with running_sink() as sink:
        started = time.perf_counter()
        with smtplib.SMTP(sink.host, sink.port) as client:
            for raw in forwarded:
                client.sendmail(FORWARD_FROM, [FORWARD_TO], raw)
        floor = time.perf_counter() - started
    if naive.status != 0 or naive_sent != expected or len(forwarded) != expected:
        raise RuntimeError(
            f"forwarded {len(forwarded)} (relay), {naive_sent} (naive), "
            f"expected {expected}:\n{naive.stderr[-2000:]}"
        )
    return BackfillRun(naive=naive, relay=relay, floor=floor)


def backfill(bench: Bench, count: int, repeat: int = 1) -> Measured:
    mails = corpus.invoice_mails(count)
    expected = corpus.distinct_pdfs(mails)
    bench.say(f"## backfill: {count} mails, {expected} distinct PDFs forwarded by each")
    runs: list[BackfillRun] = []
    for index in range(repeat):
        run = _backfill_round(bench, mails, expected, index, naive_first=index % 2 == 0)
        runs.append(run)
        if repeat > 1:
            first = "naive first" if index % 2 == 0 else "relay first"
            bench.say(
                f"  round {index + 1} ({first}): naive {run.naive.seconds:6.2f} s   relay "
                f"{run.relay.seconds:6.2f} s   ratio {run.ratio:.2f}   floor {run.floor:5.2f} s"
            )
    naive_s = statistics.median(run.naive.seconds for run in runs)
    relay_s = statistics.median(run.relay.seconds for run in runs)
    floor_s = statistics.median(run.floor for run in runs)
    ratio = statistics.median(run.ratio for run in runs)
    what = f"median of {repeat} " if repeat > 1 else ""
    bench.say(f"naive baseline           {naive_s:8.2f} s")
    bench.say(
        f"invoice-relay once       {relay_s:8.2f} s   {what}ratio to naive {ratio:.2f} "
        f"(target <= 0.5: {_verdict(ratio <= 0.5)})"
    )
    bench.say(
        f"SMTP sink floor          {floor_s:8.2f} s   relay / floor {_ratio(relay_s, floor_s)}"
    )
    _cpu_lines(bench, runs)
    return runs[-1].relay


def _cpu_lines(bench: Bench, runs: Sequence[BackfillRun]) -> None:
    """What bounds the wall time: the CPU all processes of a run need (the relay or the
    naive script, Dovecot, the sink in the bench's process, the rest: the relay's PDF
    workers and the kernel) on the machine's cores. Medians over the rounds."""
    cores = os.cpu_count() or 1
    bench.say(f"CPU seconds (all {cores} cores)  machine = own + Dovecot + sink + rest")
    for name, measured in (
        ("naive", [run.naive for run in runs]),
        ("relay", [run.relay for run in runs]),
    ):
        machine = statistics.median(m.machine_cpu_seconds for m in measured)
        own = statistics.median(m.cpu_seconds for m in measured)
        parts = {
            key: statistics.median(m.watched_cpu_seconds.get(key, 0.0) for m in measured)
            for key in bench.cpu_watch
        }
        rest = machine - own - sum(parts.values())
        shown = "  ".join(f"{key} {value:5.2f}" for key, value in parts.items())
        bench.say(
            f"  {name:<6} {machine:6.2f} = own {own:5.2f}  {shown}  rest {rest:5.2f}   "
            f"wall >= {machine / cores:.2f} s"
        )
    # No schedule runs the relay's work in less than its CPU over the cores: the lowest
    # ratio that work allows against the naive script, and how busy the relay kept them.
    bound = statistics.median(
        run.relay.machine_cpu_seconds / cores / run.naive.seconds for run in runs
    )
    busy = statistics.median(
        run.relay.machine_cpu_seconds / (cores * run.relay.seconds) for run in runs
    )
    bench.say(
        f"  lowest ratio the relay's CPU allows {bound:.2f}; its run kept the cores {busy:.0%} busy"
    )


def idle_polls(bench: Bench, large: int, small: int, repeats: int) -> None:
    template = corpus.invoice_mails(min(small, 300), seed=3)
    seed_db = bench.scratch / "backfill.db"
    timings: dict[int, list[float]] = {}
    commands: list[str] = []
    for size in (small, large):
        folder = f"Idle-{size}"
        bench.fill(folder, [template[i % len(template)] for i in range(size)])
        database = bench.scratch / f"idle-{size}.db"
        # Start from the backfill's database, so both polls meet the same, used store.
        if seed_db.exists():
            shutil.copyfile(seed_db, database)
        with running_sink() as sink:
            env = bench.env(sink, folder, database)
            # Mark the folder read: a first poll that takes nothing (SINCE the future)
            # moves the position to the end, as a poll that had read it all would.
            bench.once({**env, "INVOICE_RELAY_SINCE": "2999-01-01"}, f"idle-{size}-first")
            timings[size] = [bench.once(env, f"idle-{size}").seconds for _ in range(repeats)]
            with counting_proxy(bench.server.host, bench.server.port) as proxy:
                bench.once(
                    {**env, "INVOICE_RELAY_IMAP_PORT": str(proxy.port)}, f"idle-{size}-counted"
                )
                seen = proxy.commands
            if size == large:
                commands = seen
            if sink.messages:
                raise RuntimeError(f"a no-news poll forwarded {len(sink.messages)} mails")
    small_s = statistics.median(timings[small])
    large_s = statistics.median(timings[large])
    after_login = commands[commands.index("LOGIN") + 1 :] if "LOGIN" in commands else commands
    bench.say(f"## idle poll (nothing new), median of {repeats} `once` runs")
    bench.say(f"{small:>6} mails           {small_s:8.3f} s")
    bench.say(
        f"{large:>6} mails           {large_s:8.3f} s   ratio {_ratio(large_s, small_s)} "
        f"(target <= 1.5: {_verdict(large_s <= 1.5 * small_s)})"
    )
    bench.say(
        f"IMAP commands            {' '.join(commands)}; after LOGIN: {len(after_login)} "
        f"(target <= 3: {_verdict(len(after_login) <= 3)})"
    )


def memory(bench: Bench, backfill_run: Measured | None, large_mb: int) -> None:
    peaks: dict[str, Measured] = {}
    for name, mail in (
        ("one-invoice", corpus.invoice_mails(1)[0]),
        ("large", corpus.large_attachment_mail(large_mb * 1_000_000)),
    ):
        bench.fill(f"Memory-{name}", [mail])
        with running_sink() as sink:
            peaks[name] = bench.once(
                bench.env(sink, f"Memory-{name}", bench.scratch / f"memory-{name}.db"), name
            )
            # aiosmtpd refuses mails over 32 MiB once it has read them: the 25 MB PDF
            # (34 MB in base64) is sent whole all the same, which is what is measured.
            refused = "Too much mail data" in peaks[name].stderr
            if len(sink.messages) != 1 and not refused:
                raise RuntimeError(f"{name}: forwarded {len(sink.messages)} mails, not 1")
    base, large = peaks["one-invoice"], peaks["large"]
    added = large.main_peak_mib - base.main_peak_mib
    size_mib = large_mb * 1_000_000 / 2**20
    bench.say("## memory: peak RSS (MiB) of the `once` process / its PDF workers")
    if backfill_run is not None:
        bench.say(
            f"backfill                 {backfill_run.main_peak_mib:8.1f} / "
            f"{backfill_run.children_peak_mib:.1f}   (target <= 150: "
            f"{_verdict(backfill_run.main_peak_mib <= 150)})"
        )
    bench.say(f"poll of one invoice      {base.main_peak_mib:8.1f} / {base.children_peak_mib:.1f}")
    bench.say(
        f"poll of a {large_mb} MB PDF     {large.main_peak_mib:8.1f} / "
        f"{large.children_peak_mib:.1f}   adds {added:.1f} MiB = "
        f"{added / size_mib:.1f}x its size (target <= ~3x: {_verdict(added <= 3 * size_mib)})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--mails", type=int, default=2000, help="mails in the backfill")
    parser.add_argument("--idle-mails", type=int, default=30_000, help="the large idle folder")
    parser.add_argument("--latency-mails", type=int, default=100)
    parser.add_argument("--large-mb", type=int, default=25, help="the large attachment, MB")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a lighter run for development: 300 mails, 3,000 idle, 20 latency",
    )
    parser.add_argument(
        "--only",
        default="backfill,idle,memory,latency",
        help="comma list of the parts to run (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="backfill rounds, naive and relay alternating first on fresh folders; "
        "medians are reported (default 1)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=25.0,
        help="the WAN part's one-way delay on IMAP and SMTP (`--only wan`), default 25",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="the latency parts (`latency`, `wan-latency`) also run the relay of this "
        "checkout, first, in the same run",
    )
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if args.quick:
        args.mails, args.idle_mails, args.latency_mails = 300, 3000, 20
    scratch = Path(tempfile.mkdtemp(prefix="invoice-relay-bench-"))
    (scratch / "dovecot").mkdir()
    try:
        with running_dovecot(scratch / "dovecot", tls=False) as server:
            # BENCH_WRAP (e.g. "py-spy record -o /tmp/p.txt --format raw --") runs each
            # `once` under a profiler.
            wrap = tuple(shlex.split(os.environ.get("BENCH_WRAP", "")))
            bench = Bench(
                server=server,
                scratch=scratch,
                relay=(*wrap, *RELAY),
                cpu_watch={
                    "Dovecot": server_cpu(server.config_file),
                    "sink": bench_process_cpu_seconds,
                },
            )
            bench.say(
                f"# invoice-relay bench, {dt.date.today().isoformat()}, "
                f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                f"Python {platform.python_version()}"
            )
            bench.say(f"# command: bench/run {' '.join(argv or sys.argv[1:])}".rstrip())
            relay = backfill(bench, args.mails, args.repeat) if "backfill" in parts else None
            if "idle" in parts:
                idle_polls(bench, args.idle_mails, 300, repeats=5)
            if "memory" in parts:
                memory(bench, relay, args.large_mb)
            if "latency" in parts:
                measure_latency(bench, args.latency_mails, before=args.before)
            if "wan" in parts:
                wan_backfill(bench, args.mails, delay_ms=args.delay_ms)
            if "wan-latency" in parts:
                wan_latency(bench, args.latency_mails, delay_ms=args.delay_ms, before=args.before)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
