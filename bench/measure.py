"""Running a command while measuring its wall time and peak resident memory."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    command: Sequence[str], *, env: Mapping[str, str], log: Path, timeout: float = 1800.0
) -> Measured:
    """Run `command`, sampling the memory of it and its children until it exits."""
    with log.open("wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command), env=dict(env), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
        sampler = _Sampler(process.pid)
        sampler.start()
        deadline = started + timeout
        while True:
            # Not wait4's ru_maxrss: after fork and exec it counts the parent's memory too.
            pid, wait_status = os.waitpid(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        sampler.stop()
    return Measured(
        status=process.returncode,
        seconds=seconds,
        main_peak_mib=sampler.main_kib / 1024,
        children_peak_mib=sampler.children_kib / 1024,
        stderr=log.read_text(errors="replace"),
    )
