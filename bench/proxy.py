"""A TCP proxy that counts the IMAP commands a client sends through it (plain IMAP only)."""

from __future__ import annotations

import re
import socket
import threading
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
