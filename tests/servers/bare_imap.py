"""A scripted IMAP server on loopback, for counting what the relay sends to servers
unlike Dovecot: a greeting that lists no capabilities, an EXAMINE without UIDNEXT (as
Courier answers). It speaks only the commands an empty poll needs, and counts them."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Session(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        server = self.server
        if server.greeting_capabilities:
            self.wfile.write(f"* OK [CAPABILITY {server.capabilities}] ready\r\n".encode())
        else:
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
                uidnext = "\r\n* OK [UIDNEXT 1] ok" if server.uidnext_in_examine else ""
                self._answer(f"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok{uidnext}", tag)
            elif command == "STATUS":
                self._answer('* STATUS "INBOX" (UIDVALIDITY 7 UIDNEXT 1)', tag)
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

    def __init__(self, *, greeting_capabilities: bool, uidnext_in_examine: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Session)
        self.lock = threading.Lock()
        self.commands: list[str] = []
        self.capabilities = "IMAP4rev1 AUTH=PLAIN"
        self.greeting_capabilities = greeting_capabilities
        self.uidnext_in_examine = uidnext_in_examine


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
def running_bare_imap(
    *, greeting_capabilities: bool = False, uidnext_in_examine: bool = True
) -> Iterator[BareImap]:
    server = _Server(
        greeting_capabilities=greeting_capabilities, uidnext_in_examine=uidnext_in_examine
    )
    thread = threading.Thread(target=server.serve_forever, name="bare-imap", daemon=True)
    thread.start()
    try:
        yield BareImap(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
