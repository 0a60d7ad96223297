"""Many routes on a few replicas (docs/performance.md, "Many routes"): real Dovecot
users from a passwd-file, mail written into their Maildirs, PostgreSQL, the SMTP sink,
and several `invoice-relay run` processes sharing one routes file.

    bench/run --scale                           1,000 routes, 3 replicas, `1m` schedule
    python -m bench.routes_scale --routes 200   a lighter run

What it reports: every invoice forwarded once; IMAP logins per route per claimed fire
time (from Dovecot's log); the delay from a fire time to its poll's start; the time
until the routes of a SIGKILLed and a SIGSTOPped replica are served again; CPU seconds
per idle poll and per forwarded invoice; peak RSS and threads per replica; PostgreSQL
connections. The schedule is compressed (a `1m` interval standing for the `5m` of a
shop) so that a run takes minutes; the per-poll costs it measures do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bench.corpus import distinct_invoice_mails
from tests.servers.dovecot import MAIL_USER, DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink, free_port, running_sink

FORWARD_FROM = "relay@agency.example"
PASSWORD = "bench-password"
_LOGIN = re.compile(r"imap-login: (?:Info: )?Login: user=<([^>]+)>")


class PasswdFileDovecot(DovecotServer):
    """Dovecot with one passwd-file user per route (as an agency's mail host has)."""

    def __init__(self, base_dir: Path, users: Sequence[str]) -> None:
        self._users = tuple(users)
        super().__init__(base_dir, tls=False, password=PASSWORD)

    def _prepare(self) -> None:
        super()._prepare()
        # Under the server's own root: the auth process reads it after dropping privileges.
        passwd = self._root / "users.passwd"
        passwd.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in self._users))
        passwd.chmod(0o644)
        text = self.config_file.read_text()
        static = f"  driver = static\n  args = password={PASSWORD}\n"
        if static not in text:
            raise RuntimeError("the test server's passdb changed; update the bench")
        text = text.replace(static, f"  driver = passwd-file\n  args = {passwd}\n", 1)
        # Enough login and mail processes for every replica's parallel polls.
        text += "service imap-login {\n  process_min_avail = 2\n}\n"
        self.config_file.write_text(text)

    def write_inbox(self, user: str, mails: Sequence[bytes], *, tag: str) -> None:
        """Mail put straight into `user`'s INBOX Maildir, as a local delivery agent does."""
        account = pwd.getpwnam(MAIL_USER)
        top = self._mail_root() / user
        for sub in ("", "cur", "new", "tmp"):
            (top / sub).mkdir(parents=True, exist_ok=True)
            os.chown(top / sub, account.pw_uid, account.pw_gid)
        for number, raw in enumerate(mails):
            path = top / "new" / f"{int(time.time())}.M{number}{tag}P{os.getpid()}.bench"
            path.write_bytes(raw)
            os.chown(path, account.pw_uid, account.pw_gid)

    def _mail_root(self) -> Path:
        match = re.search(r"^mail_location = maildir:(.+)/%u$", self.config_file.read_text(), re.M)
        if match is None:
            raise RuntimeError("no maildir mail_location")
        return Path(match.group(1))

    def logins(self) -> Counter[str]:
        return Counter(_LOGIN.findall(self.log()))


@dataclass(slots=True)
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    log_file: Path
    peak_rss_kib: int = 0
    peak_threads: int = 0

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                self.peak_rss_kib = max(self.peak_rss_kib, int(value.split()[0]))
            elif key == "Threads":
                self.peak_threads = max(self.peak_threads, int(value))

    def cpu_seconds(self) -> float:
        """The replica's process group: the relay and its PDF workers."""
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:
                ticks += sum(int(value) for value in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def lines(self) -> Iterator[dict[str, object]]:
        for raw in self.log_file.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:
                    continue


@dataclass(slots=True)
class Scale:
    scratch: Path
    server: PasswdFileDovecot
    sink: SmtpSink
    database_url: str
    routes: int
    schedule: str
    replicas: list[Replica] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    peak_connections: int = 0

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.out.append(line)

    def routes_file(self) -> Path:
        (self.scratch / "imap-password").write_text(PASSWORD + "\n")
        (self.scratch / "imap-password").chmod(0o600)
        lines = [
            "[relay]",
            f'database_url = "{self.database_url}"',
            'log_format = "json"',
            "",
            "[defaults]",
            f'imap_host = "{self.server.host}"',
            f"imap_port = {self.server.port}",
            'imap_security = "none"',
            'imap_password_file = "imap-password"',
            f'smtp_host = "{self.sink.host}"',
            f"smtp_port = {self.sink.port}",
            'smtp_security = "none"',
            f'forward_from = "{FORWARD_FROM}"',
            f'schedule = "{self.schedule}"',
        ]
        for index in range(self.routes):
            lines += [
                "",
                "[[routes]]",
                f'name = "client-{index:05d}"',
                f'imap_user = "{user(index)}"',
                f'forward_to = "inbox-{index}@getmyinvoices.example"',
            ]
        path = self.scratch / "routes.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_replica(self, name: str, config: Path) -> Replica:
        log_file = self.scratch / f"{name}.log"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.scratch),
            "INVOICE_RELAY_CONFIG": str(config),
            "INVOICE_RELAY_HTTP_PORT": str(free_port()),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file.open("wb"),
            start_new_session=True,
        )
        replica = Replica(name=name, process=process, log_file=log_file)
        self.replicas.append(replica)
        return replica

    def connections(self) -> int:
        with psycopg.connect(_libpq(self.database_url), autocommit=True) as connection:
            row = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0]) if row else 0

    def forwarded(self) -> int:
        return len(self.sink.messages)

    def last_success(self) -> dict[str, datetime]:
        with psycopg.connect(_libpq(self.database_url), autocommit=True) as connection:
            rows = connection.execute(
                "SELECT route, last_success_at FROM route_polls WHERE last_success_at IS NOT NULL"
            ).fetchall()
        return {str(route): at.astimezone(UTC) for route, at in rows}

    def claims(self) -> Counter[str]:
        with psycopg.connect(_libpq(self.database_url), autocommit=True) as connection:
            rows = connection.execute("SELECT route, count(*) FROM poll_claims GROUP BY route")
            return Counter({str(route): int(count) for route, count in rows})


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def user(index: int) -> str:
    return f"client-{index:05d}@mail.agency.example"


def _wait(what: str, done: object, timeout: float, scale: Scale) -> float:
    """Poll a condition (a callable) while sampling the replicas; seconds it took."""
    assert callable(done)
    started = time.monotonic()
    peak = 0
    while not done():
        for replica in scale.replicas:
            replica.sample()
        peak = max(peak, scale.connections())
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)
    scale.peak_connections = max(scale.peak_connections, peak)
    return time.monotonic() - started


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def fire_delays(
    replicas: Sequence[Replica], since: datetime, until: datetime | None = None
) -> list[float]:
    """Fire time to poll start, for fire times after `since` (the replicas' start: the
    start-up poll of a fire time before it is a catch-up, late on purpose) and before
    `until`."""
    delays = []
    for replica in replicas:
        for line in replica.lines():
            if line.get("action") == "poll_started" and line.get("fire_time"):
                started = datetime.fromisoformat(str(line["ts"]))
                fire = datetime.fromisoformat(str(line["fire_time"]))
                if fire > since and (until is None or fire < until):
                    delays.append((started - fire).total_seconds())
    return delays


def poll_seconds(replicas: Sequence[Replica]) -> list[float]:
    """Wall time of each poll: the pipeline's start to its end line, per mailbox."""
    spans: list[float] = []
    for replica in replicas:
        begun: dict[str, datetime] = {}
        for line in replica.lines():
            if line.get("logger") != "worker.relay.pipeline" or "mailbox" not in line:
                continue
            mailbox, at = str(line["mailbox"]), datetime.fromisoformat(str(line["ts"]))
            if line.get("action") == "poll_started":
                begun[mailbox] = at
            elif line.get("action") == "poll_finished" and mailbox in begun:
                spans.append((at - begun.pop(mailbox)).total_seconds())
    return spans


def count_actions(replicas: Sequence[Replica], action: str) -> int:
    """Lines of the scheduler with `action` (each names a fire time; the pipeline's own
    `poll_started` line does not, and is not counted)."""
    return sum(
        1
        for r in replicas
        for line in r.lines()
        if line.get("action") == action and line.get("fire_time")
    )


def run_scale(scale: Scale, *, invoices_per_route: int) -> None:
    config = scale.routes_file()
    mails = distinct_invoice_mails(scale.routes * invoices_per_route * 2)
    first, second = mails[: len(mails) // 2], mails[len(mails) // 2 :]
    for index in range(scale.routes):
        chunk = first[index * invoices_per_route : (index + 1) * invoices_per_route]
        scale.server.write_inbox(user(index), chunk, tag="a")
    expected = len(first)
    scale.say(f"{scale.routes} routes, {expected} invoices, schedule {scale.schedule}")

    started_cpu = time.monotonic()
    started_at = datetime.now(UTC)
    for number in range(3):
        scale.start_replica(f"replica-{number + 1}", config)
    backfill = _wait("the backfill", lambda: scale.forwarded() >= expected, 1800, scale)
    backfill_cpu = sum(r.cpu_seconds() for r in scale.replicas)
    scale.say(
        f"backfill: {expected} invoices forwarded in {backfill:.1f} s "
        f"({time.monotonic() - started_cpu:.1f} s after start), "
        f"replica CPU {backfill_cpu:.1f} s"
    )

    # Idle: two whole intervals with nothing new.
    polls_before = count_actions(scale.replicas, "poll_started")
    cpu_before = sum(r.cpu_seconds() for r in scale.replicas)
    interval = _interval_seconds(scale.schedule)
    deadline = time.monotonic() + 2 * interval
    _wait("two idle intervals", lambda: time.monotonic() >= deadline, 4 * interval, scale)
    idle_polls = count_actions(scale.replicas, "poll_started") - polls_before
    idle_cpu = sum(r.cpu_seconds() for r in scale.replicas) - cpu_before
    per_idle = idle_cpu / idle_polls if idle_polls else float("nan")
    scale.say(
        f"idle: {idle_polls} polls in {2 * interval:.0f} s, "
        f"{per_idle * 1000:.1f} ms CPU per idle poll"
    )

    # A kill and a freeze while new mail arrives for every route.
    killed, frozen, survivor = scale.replicas
    for index in range(scale.routes):
        chunk = second[index * invoices_per_route : (index + 1) * invoices_per_route]
        scale.server.write_inbox(user(index), chunk, tag="b")
    fault_at = datetime.now(UTC)
    os.killpg(killed.process.pid, signal.SIGKILL)
    os.killpg(frozen.process.pid, signal.SIGSTOP)
    survivor_cpu = survivor.cpu_seconds()
    names = [f"client-{index:05d}" for index in range(scale.routes)]

    def all_served() -> bool:
        success = scale.last_success()
        return all(success.get(name, fault_at) > fault_at for name in names)

    served = _wait("every route served after the faults", all_served, 1800, scale)
    done = _wait("every invoice forwarded", lambda: scale.forwarded() >= 2 * expected, 1800, scale)
    forwarded_cpu = survivor.cpu_seconds() - survivor_cpu
    scale.say(
        f"after SIGKILL of {killed.name} and SIGSTOP of {frozen.name}: every route "
        f"served again within {served:.1f} s, every invoice within {served + done:.1f} s"
    )
    per_invoice = (forwarded_cpu - scale.routes * per_idle) / expected
    scale.say(
        f"CPU per forwarded invoice (the survivor, idle share taken out): "
        f"{per_invoice * 1000:.1f} ms"
    )
    os.killpg(frozen.process.pid, signal.SIGCONT)

    copies = Counter(str(mail.message["X-Invoice-Relay"]).strip() for mail in scale.sink.messages)
    duplicated = sum(count - 1 for count in copies.values())
    scale.say(f"forwarded {len(copies)} distinct of {2 * expected}; duplicates {duplicated}")
    logins, claims = scale.server.logins(), scale.claims()
    ratios = [
        logins[user(i)] / claims[f"client-{i:05d}"]
        for i in range(scale.routes)
        if claims[f"client-{i:05d}"]
    ]
    exact = sum(1 for value in ratios if value == 1)
    scale.say(
        f"logins per claimed fire time: {exact} of {len(ratios)} routes exactly 1, "
        f"max {max(ratios, default=0):.2f}, mean {statistics.fmean(ratios):.3f}"
    )
    steady = fire_delays(scale.replicas, started_at, fault_at)
    scale.say(
        f"fire time to poll start before the faults: p50 {percentile(steady, 0.5):.2f} s, "
        f"p95 {percentile(steady, 0.95):.2f} s ({len(steady)} polls)"
    )
    delays = fire_delays(scale.replicas, started_at)
    scale.say(
        f"fire time to poll start, all (the faults included): p50 {percentile(delays, 0.5):.2f} s, "
        f"p95 {percentile(delays, 0.95):.2f} s ({len(delays)} polls)"
    )
    skipped = count_actions(scale.replicas, "poll_skipped")
    scale.say(f"fire times claimed by another replica (poll_skipped): {skipped}")
    for replica in scale.replicas:
        scale.say(
            f"{replica.name}: peak RSS {replica.peak_rss_kib / 1024:.0f} MiB, "
            f"peak threads {replica.peak_threads}"
        )
    scale.say(f"PostgreSQL connections, peak: {scale.peak_connections}")
    spans = poll_seconds(scale.replicas)
    wall = statistics.fmean(spans) if spans else float("nan")
    scale.say(
        f"poll wall time: mean {wall:.3f} s, p95 {percentile(spans, 0.95):.3f} s "
        f"({len(spans)} polls)"
    )
    _estimate(scale, per_idle, wall)


def _estimate(scale: Scale, per_idle: float, wall: float) -> None:
    """What more routes need on a `5m` schedule, from the measured costs: CPU per idle
    poll, and polls in flight (wall time per poll; 8 at once per replica)."""
    connections = scale.peak_connections / len(scale.replicas)
    for routes in (10_000, 100_000):
        rate = routes / 300
        cores = rate * per_idle
        in_flight = rate * wall
        replicas = max(1, -(-in_flight // 8), -(-cores // 0.8))
        scale.say(
            f"estimate for {routes} routes on 5m: {rate:.0f} polls/s, {cores:.1f} cores of "
            f"relay CPU, {in_flight:.1f} polls in flight: {replicas:.0f} replicas at 8 polls "
            f"each and 0.8 core each, about {replicas * connections:.0f} PostgreSQL "
            f"connections ({connections:.0f} per replica, as measured)"
        )


def _interval_seconds(schedule: str) -> float:
    number, unit = float(schedule[:-1]), schedule[-1]
    return number * {"s": 1, "m": 60, "h": 3600}[unit]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--schedule", default="1m")
    parser.add_argument("--invoices-per-route", type=int, default=1)
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-scale-")))
        users = [user(index) for index in range(args.routes)]
        server = PasswdFileDovecot(scratch / "dovecot", users)
        stack.callback(server.cleanup)
        server.start()
        sink = stack.enter_context(running_sink())
        database_url = stack.enter_context(temporary_database())
        scale = Scale(
            scratch=scratch,
            server=server,
            sink=sink,
            database_url=database_url,
            routes=args.routes,
            schedule=args.schedule,
        )
        stack.enter_context(_stopping(scale))
        run_scale(scale, invoices_per_route=args.invoices_per_route)
    return 0


@contextmanager
def _stopping(scale: Scale) -> Iterator[None]:
    try:
        yield
    finally:
        for replica in scale.replicas:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                with suppress(ProcessLookupError):
                    os.killpg(replica.process.pid, signum)
            replica.process.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
