"""TCP proxies for the bench: one counts the IMAP commands a client sends (plain IMAP
only), one adds a one-way delay in each direction (the WAN mode)."""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_COMMAND = re.compile(rb"^[A-Za-z0-9]+ (UID [A-Za-z]+|[A-Za-z]+)")
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class CountingProxy:
    """Forwards 127.0.0.1:`port` to the server; records each command's name in order."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._commands: list[str] = []
        self._threads: list[threading.Thread] = []

    @property
    def commands(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    def clear(self) -> None:
        with self._lock:
            self._commands.clear()

    def start(self) -> None:
        self._spawn(self._accept)

    def close(self) -> None:
        self._listener.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._spawn(self._pipe, server, client, False)
            self._spawn(self._pipe, client, server, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        pending = b""
        skip = 0
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if count:
                    pending, skip = self._count(pending + data, skip)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def _count(self, buffer: bytes, skip: int) -> tuple[bytes, int]:
        while True:
            if skip:
                taken = min(skip, len(buffer))
                buffer, skip = buffer[taken:], skip - taken
                if skip:
                    return buffer, skip
            line, newline, rest = buffer.partition(b"\r\n")
            if not newline:
                return buffer, 0
            line += newline
            if match := _COMMAND.match(line):
                with self._lock:
                    self._commands.append(match.group(1).decode("ascii").upper())
            elif line.strip().upper() == b"DONE":
                with self._lock:
                    self._commands.append("DONE")
            literal = _LITERAL.search(line)
            buffer, skip = rest, int(literal.group(1)) if literal else 0


@contextmanager
def counting_proxy(host: str, port: int) -> Iterator[CountingProxy]:
    proxy = CountingProxy((host, port))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


class DelayProxy:
    """Forwards 127.0.0.1:`port` to `target`, handing on every byte `delay` seconds after
    it arrived, in each direction: a link's one-way delay (bandwidth unlimited). Counts
    the client's turns (it sent after the server last did): the round trips it waited
    for, at most; `turn_times` says when each began. `watch`: byte strings whose
    arrival at the client, in what the server sends, is timed (`seen`).

    The TCP handshake is not delayed: a new connection costs one delay for the greeting
    here, where a real link adds a round trip for the handshake before it."""

    def __init__(
        self, target: tuple[str, int], delay: float, *, watch: tuple[bytes, ...] = ()
    ) -> None:
        self._target = target
        self._delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.turns = 0
        self.turn_times: list[float] = []  # time.monotonic() of each turn
        self.connections = 0
        self.seen: dict[bytes, list[float]] = {pattern: [] for pattern in watch}

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def turns_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at in self.turn_times if start <= at <= end)

    def first_seen(self, pattern: bytes, after: float) -> float | None:
        """When `pattern` first reached the client after `after`; None if it did not."""
        with self._lock:
            return min((at for at in self.seen[pattern] if at >= after), default=None)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            last: list[str] = [""]
            for source, sink, direction in ((client, server, "up"), (server, client, "down")):
                pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(
                    target=self._read, args=(source, pending, direction, last), daemon=True
                ).start()
                threading.Thread(target=self._write, args=(sink, pending), daemon=True).start()

    def _read(
        self,
        source: socket.socket,
        pending: queue.Queue[tuple[float, bytes]],
        direction: str,
        last: list[str],
    ) -> None:
        data = b""
        with suppress(OSError):
            while data := source.recv(65536):
                now = time.monotonic()
                with self._lock:
                    if direction == "up" and last[0] == "down":
                        self.turns += 1
                        self.turn_times.append(now)
                    if direction == "down":
                        for pattern, times in self.seen.items():
                            if pattern in data:
                                times.append(now + self._delay)
                    last[0] = direction
                pending.put((now + self._delay, data))
        pending.put((time.monotonic() + self._delay, b""))

    @staticmethod
    def _write(sink: socket.socket, pending: queue.Queue[tuple[float, bytes]]) -> None:
        with suppress(OSError):
            while True:
                due, data = pending.get()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # the simulated link's delay, not a wait for a condition
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)


@contextmanager
def delay_proxy(
    host: str, port: int, delay: float, *, watch: tuple[bytes, ...] = ()
) -> Iterator[DelayProxy]:
    proxy = DelayProxy((host, port), delay, watch=watch)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
