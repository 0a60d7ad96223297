"""A scripted IMAP server on loopback whose greeting lists no capabilities (as some
Courier and Exchange set-ups answer), for counting what the relay sends to such a
server. It speaks only the commands an empty poll needs."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Session(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.wfile.write(b"* OK bare IMAP ready\r\n")
        for line in self.rfile:
            tag, _, rest = line.decode("ascii", "replace").rstrip("\r\n").partition(" ")
            command = rest.split(" ", 1)[0].upper()
            with self.server.lock:
                self.server.commands.append(command)
            if command == "CAPABILITY":
                self._answer(f"* CAPABILITY {self.server.capabilities}", tag)
            elif command == "LOGIN":
                self._answer("", tag)
            elif command in ("EXAMINE", "SELECT"):
                self._answer("* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 1] ok", tag)
            elif command == "LOGOUT":
                self._answer("* BYE bye", tag)
                return
            else:
                self.wfile.write(f"{tag} BAD not scripted\r\n".encode())

    def _answer(self, untagged: str, tag: str) -> None:
        lines = f"{untagged}\r\n" if untagged else ""
        self.wfile.write(f"{lines}{tag} OK done\r\n".encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Session)
        self.lock = threading.Lock()
        self.commands: list[str] = []
        self.capabilities = "IMAP4rev1 AUTH=PLAIN"


class BareImap:
    def __init__(self, server: _Server) -> None:
        self._server = server
        self.host = "127.0.0.1"
        self.port = int(server.server_address[1])

    @property
    def commands(self) -> list[str]:
        """The commands received, in order, by name."""
        with self._server.lock:
            return list(self._server.commands)


@contextmanager
def running_bare_imap() -> Iterator[BareImap]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, name="bare-imap", daemon=True)
    thread.start()
    try:
        yield BareImap(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
