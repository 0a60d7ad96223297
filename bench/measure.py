"""Running a command while measuring its wall time and peak resident memory."""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_SAMPLE_SECONDS = 0.02


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """One finished process: exit status, wall time, peak RSS (MiB) and its stderr."""

    status: int
    seconds: float
    main_peak_mib: float  # VmHWM of the process itself
    children_peak_mib: float  # the largest VmHWM among its descendants (PDF workers)
    stderr: str
    cpu_seconds: float = 0.0  # user + system of the process and the children it reaped
    machine_cpu_seconds: float = 0.0  # every core's busy time while it ran (/proc/stat)
    watched_cpu_seconds: Mapping[str, float] = field(default_factory=dict)  # see `watch`


def bench_process_cpu_seconds() -> float:
    """User + system time of this process (the bench, with the SMTP sink's thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_group_cpu_seconds(pgid: int) -> float:
    """CPU time of a process group: each live member's, with its reaped children's."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        if int(fields[2]) == pgid:  # fields[0] is the state: pgrp is the 5th field
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu(config_file: Path) -> Callable[[], float]:
    """A CPU counter for the server started with `config_file` on its command line (the
    bench's Dovecot; its login and IMAP processes share the master's process group)."""
    marker = str(config_file).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                return functools.partial(_process_group_cpu_seconds, os.getpgid(int(entry)))
        except OSError:
            continue
    return lambda: 0.0


def machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine since boot, all cores (from /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
            except OSError:
                continue
            for child in text.split():
                found.append(int(child))
                queue.append(int(child))
    return found


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._done = threading.Event()
        self.main_kib = 0
        self.children_kib = 0

    def run(self) -> None:
        while not self._done.is_set():
            self.main_kib = max(self.main_kib, _vm_hwm_kib(self._pid))
            for child in _descendants(self._pid):
                self.children_kib = max(self.children_kib, _vm_hwm_kib(child))
            self._done.wait(_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    timeout: float = 1800.0,
    watch: Mapping[str, Callable[[], float]] | None = None,
) -> Measured:
    """Run `command`, sampling the memory of it and its children until it exits; `watch`
    names CPU counters (seconds) whose growth while it ran is reported too."""
    watch = watch or {}
    with log.open("wb") as stderr:
        watched_before = {name: counter() for name, counter in watch.items()}
        busy_before = machine_busy_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command), env=dict(env), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
        sampler = _Sampler(process.pid)
        sampler.start()
        deadline = started + timeout
        while True:
            # Not wait4's ru_maxrss: after fork and exec it counts the parent's memory too.
            pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        busy = machine_busy_seconds() - busy_before
        watched = {name: counter() - watched_before[name] for name, counter in watch.items()}
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        sampler.stop()
    return Measured(
        status=process.returncode,
        seconds=seconds,
        main_peak_mib=sampler.main_kib / 1024,
        children_peak_mib=sampler.children_kib / 1024,
        stderr=log.read_text(errors="replace"),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        machine_cpu_seconds=busy,
        watched_cpu_seconds=watched,
    )
