"""A loopback TCP proxy that can stall or cut a connection mid-stream.

Put it between the relay and a real server (Dovecot, the SMTP sink) and script a
`Fault`: once the bytes in one direction contain `after_pattern` (matched without
regard to case, so `b"data\\r\\n"` finds smtplib's DATA), let `after_bytes` more
through, then stop forwarding that direction (`stall`: the peer waits for bytes
that never come, while the connection stays open), close both sides (`drop`: a cut
line), pause until `release()` (`hold`: for a test to act at that exact moment) or
pass the rest one byte per `trickle_seconds` (`trickle`: a server slow enough to
stretch a poll, yet never silent long enough for a socket timeout).
`black_hole()` swallows everything from then on, on every connection, open or new: a
node lost without a word (no FIN, no answer).
Plain protocols only: a pattern cannot be found inside TLS.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Direction = Literal["to_server", "to_client"]
Action = Literal["stall", "drop", "hold", "trickle"]
CHUNK = 4096


@dataclass(slots=True, kw_only=True)
class Fault:
    """One scripted fault; it hits the next `connections` connections, then is used up."""

    direction: Direction
    action: Action
    after_pattern: bytes = b""
    after_bytes: int = 0
    connections: int = 1
    trickle_seconds: float = 0.2  # for `trickle`: the pause before each byte


class _Turns:
    """Counts a connection's client turns: each time the client sends after the server
    last did, which is an upper bound on the round trips the client waited for (a client
    that pipelines may also send while answers are on their way)."""

    def __init__(self, proxy: StallProxy) -> None:
        self._proxy = proxy
        self._last: Direction | None = None

    def saw(self, direction: Direction) -> None:
        with self._proxy._lock:
            if direction == "to_server" and self._last == "to_client":
                self._proxy.turns += 1
            self._last = direction


class _Pump:
    """Copies one direction of one connection, applying its fault."""

    def __init__(
        self,
        source: socket.socket,
        target: socket.socket,
        *,
        fault: Fault | None,
        on_fault: threading.Event,
        cut: threading.Event,
        released: threading.Event,
        turns: _Turns | None = None,
        direction: Direction = "to_server",
        black_hole: threading.Event,
    ) -> None:
        self._turns = turns
        self._direction = direction
        self._black_hole = black_hole
        self._source = source
        self._target = target
        self._fault = fault
        self._on_fault = on_fault
        self._cut = cut
        self._released = released
        self._seen = b""  # a tail of what passed, to find a pattern split across reads
        self._allowance: int | None = None if fault and fault.after_pattern else self._start()
        self._stalled = False
        self._trickling = False

    def _start(self) -> int | None:
        return self._fault.after_bytes if self._fault is not None else None

    def run(self) -> None:
        try:
            while not self._cut.is_set():
                data = self._source.recv(CHUNK)
                if not data:
                    break
                if self._turns is not None:
                    self._turns.saw(self._direction)
                self._forward(data)
        except OSError:
            pass
        finally:
            if not self._stalled:
                self._cut.set()
                _close(self._source)
                _close(self._target)

    def _forward(self, data: bytes) -> None:
        if self._stalled or self._black_hole.is_set():
            return  # swallowed: the other side waits for bytes that never come
        if self._trickling:
            self._trickle(data)
            return
        fault = self._fault
        if fault is None:
            self._target.sendall(data)
            return
        if self._allowance is None:
            pattern = fault.after_pattern.lower()
            window = self._seen + data
            at = window.lower().find(pattern)
            if at < 0:
                self._seen = window[-len(pattern) :]
                self._target.sendall(data)
                return
            # Up to the end of the pattern passes; the allowance counts from there.
            end = at + len(pattern) - len(self._seen)
            self._target.sendall(data[:end])
            data = data[end:]
            self._allowance = fault.after_bytes
        passing = data[: self._allowance]
        if passing:
            self._target.sendall(passing)
        self._allowance -= len(passing)
        if self._allowance == 0:
            self._trip(fault)
            if fault.action == "hold":
                self._fault = None  # released: from now on a plain copy
                self._target.sendall(data[len(passing) :])
            elif fault.action == "trickle":
                self._trickle(data[len(passing) :])

    def _trickle(self, data: bytes) -> None:
        assert self._fault is not None
        for index in range(len(data)):
            # The pace of the simulated server, not a wait for a condition.
            if self._cut.wait(self._fault.trickle_seconds):
                return
            self._target.sendall(data[index : index + 1])

    def _trip(self, fault: Fault) -> None:
        self._on_fault.set()
        if fault.action == "hold":
            # Stop reading: what the source sends next waits in the kernel's buffers.
            while not self._released.wait(0.05):
                if self._cut.is_set():
                    return
        elif fault.action == "trickle":
            self._trickling = True
        elif fault.action == "drop":
            self._cut.set()
            _abort(self._source)
            _abort(self._target)
        else:
            self._stalled = True


class StallProxy:
    """Listens on a loopback port (a free one unless `listen_port` is given) and
    forwards to `target_port`."""

    def __init__(
        self, target_port: int, *, target_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.host = "127.0.0.1"
        self._target = (target_host, target_port)
        self._listener = socket.create_server((self.host, listen_port))
        self.port = int(self._listener.getsockname()[1])
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self.tripped = threading.Event()  # set when a fault fired
        self._released = threading.Event()
        self._black_hole = threading.Event()
        self.connections = 0
        self.turns = 0  # client turns over all connections (`_Turns`)
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def release(self) -> None:
        """Let every held connection go on."""
        self._released.set()

    def black_hole(self) -> None:
        """From now on nothing passes, either way, on any connection; none is closed."""
        self._black_hole.set()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self) -> dict[Direction, Fault]:
        taken: dict[Direction, Fault] = {}
        with self._lock:
            for fault in self._faults:
                if fault.connections > 0 and fault.direction not in taken:
                    fault.connections -= 1
                    taken[fault.direction] = fault
        return taken

    def start(self) -> None:
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            faults = self._take()
            cut = threading.Event()
            with self._lock:
                self.connections += 1
                self._sockets.extend((client, server))
            routes: tuple[tuple[socket.socket, socket.socket, Direction], ...] = (
                (client, server, "to_server"),
                (server, client, "to_client"),
            )
            turns = _Turns(self)
            for source, target, direction in routes:
                pump = _Pump(
                    source,
                    target,
                    fault=faults.get(direction),
                    on_fault=self.tripped,
                    cut=cut,
                    released=self._released,
                    turns=turns,
                    direction=direction,
                    black_hole=self._black_hole,
                )
                thread = threading.Thread(target=pump.run, daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._closed.set()
        self._released.set()
        _close(self._listener)
        # A connection accepted just before the listener closed registers its sockets
        # only once the target answered: wait for the acceptor, so that every
        # connection is cut, not one that a relay would keep in its pool.
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=10)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _abort(sock)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    _close(sock)


@contextlib.contextmanager
def running_proxy(target_port: int, *, listen_port: int = 0) -> Iterator[StallProxy]:
    """A started proxy to `target_port` on loopback; every connection is cut afterwards.
    `listen_port` lets a port nobody listened on become reachable."""
    proxy = StallProxy(target_port, listen_port=listen_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
