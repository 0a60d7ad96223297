"""A small ESMTP server that offers PIPELINING and CHUNKING, for the adapter's tests.

aiosmtpd offers neither, and Postfix cannot be told to hold its answers back. This one
can: with `hold_until`, answers are queued until the commands received so far satisfy
the predicate, so a client that waits for an answer before its next command (instead of
pipelining it) never gets one and times out. Every command line is recorded in order,
with how many answers had been written when it arrived; `fail_next` scripts answers.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BufferedIOBase

HoldRule = Callable[[list[str]], bool]


@dataclass(slots=True)
class _Session:
    replies: list[bytes] = field(default_factory=list)
    sender: bool = False
    recipients: int = 0
    content: bytearray = field(default_factory=bytearray)


class ScriptedEsmtp:
    def __init__(
        self, *, pipelining: bool = True, chunking: bool = True, max_sessions: int | None = None
    ) -> None:
        self.pipelining = pipelining
        self.chunking = chunking
        self.max_sessions = max_sessions  # beyond it, a new session gets 421 at the greeting
        self.hold_until: HoldRule | None = None
        self.received: list[str] = []
        self.answered_before: list[int] = []  # per received line: answers written by then
        self.messages: list[bytes] = []
        self.sessions = 0
        self.refused_sessions = 0
        self._open_sessions = 0
        self._answers_written = 0
        self._failures: dict[str, deque[tuple[int, str]]] = {}
        self._numbered: dict[tuple[str, int], tuple[int, str]] = {}
        self._seen: dict[str, int] = {}
        self._changed = threading.Condition()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, verb: str, code: int, text: str = "scripted") -> None:
        """The next `verb` command (MAIL, RCPT, DATA, BDAT: the next chunk; DOT: the end
        of DATA content) is answered `code text`."""
        with self._changed:
            self._failures.setdefault(verb, deque()).append((code, text))

    def fail_at(self, verb: str, number: int, code: int, text: str = "scripted") -> None:
        """The `number`-th `verb` command of this server's life (from 1) is answered
        `code text`, for a command the client writes ahead."""
        with self._changed:
            self._numbered[(verb, number)] = (code, text)

    def wait_for_sessions_ended(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` sessions have come and gone (the client closed or quit)."""
        with self._changed:
            ended = self._changed.wait_for(
                lambda: self.sessions + self.refused_sessions >= count and self._open_sessions == 0,
                timeout,
            )
        assert ended, "the sessions did not end"

    def verbs(self) -> list[str]:
        return [line.split(" ", 1)[0].upper() for line in self.received]

    # --- the server side -----------------------------------------------------------

    def _handler_class(self) -> type[socketserver.StreamRequestHandler]:
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server._serve(self.rfile, self.connection)

        return Handler

    def _scripted(self, verb: str, default: tuple[int, str]) -> tuple[int, str]:
        with self._changed:
            self._seen[verb] = number = self._seen.get(verb, 0) + 1
            if (verb, number) in self._numbered:
                return self._numbered.pop((verb, number))
            queue = self._failures.get(verb)
            return queue.popleft() if queue else default

    def _record(self, line: str) -> None:
        with self._changed:
            self.received.append(line)
            self.answered_before.append(self._answers_written)
            self._changed.notify_all()

    def _answer(self, sock: socket.socket, session: _Session, code: int, text: str) -> None:
        session.replies.append(f"{code} {text}\r\n".encode())
        with self._changed:
            held = self.hold_until is not None and not self.hold_until(list(self.received))
        if not held:
            self._flush(sock, session)

    def _flush(self, sock: socket.socket, session: _Session) -> None:
        if session.replies:
            sock.sendall(b"".join(session.replies))
            with self._changed:
                self._answers_written += len(session.replies)
            session.replies.clear()

    def _serve(self, reader: BufferedIOBase, sock: socket.socket) -> None:
        with self._changed:
            if self.max_sessions is not None and self._open_sessions >= self.max_sessions:
                self.refused_sessions += 1
                self._changed.notify_all()
                sock.sendall(b"421 4.7.0 too many sessions\r\n")
                return
            self._open_sessions += 1
            self.sessions += 1
        try:
            self._converse(reader, sock)
        except OSError:
            pass
        finally:
            with self._changed:
                self._open_sessions -= 1
                self._changed.notify_all()

    def _converse(self, reader: BufferedIOBase, sock: socket.socket) -> None:
        session = _Session()
        sock.sendall(b"220 scripted ESMTP\r\n")
        readline, read = reader.readline, reader.read
        while True:
            raw = readline()
            if not raw:
                return
            line = raw.decode("ascii", "replace").rstrip("\r\n")
            self._record(line)
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                session.replies.append(self._ehlo_lines(verb))
                self._flush(sock, session)
            elif verb == "MAIL":
                code, text = self._scripted("MAIL", (250, "2.1.0 Ok"))
                session.sender = 200 <= code < 300
                self._answer(sock, session, code, text)
            elif verb == "RCPT":
                if not session.sender:
                    code, text = 503, "5.5.1 need MAIL"
                else:
                    code, text = self._scripted("RCPT", (250, "2.1.5 Ok"))
                session.recipients += 200 <= code < 300
                self._answer(sock, session, code, text)
            elif verb == "DATA":
                if not session.recipients:
                    self._answer(sock, session, 554, "5.5.1 no valid recipients")
                    continue
                code, text = self._scripted("DATA", (354, "end with <CRLF>.<CRLF>"))
                self._answer(sock, session, code, text)
                if code != 354:
                    continue
                self._flush(sock, session)
                content = bytearray()
                while (piece := readline()) not in (b".\r\n", b""):
                    content += piece[1:] if piece.startswith(b".") else piece
                self._end_mail(sock, session, bytes(content), "DOT")
            elif verb == "BDAT":
                size, _, last = argument.partition(" ")
                chunk = read(int(size))
                self._bdat(sock, session, chunk, last=last.upper() == "LAST")
            elif verb == "RSET":
                session.sender, session.recipients, session.content = False, 0, bytearray()
                self._answer(sock, session, 250, "2.0.0 Ok")
            elif verb == "NOOP":
                self._answer(sock, session, 250, "2.0.0 Ok")
            elif verb == "QUIT":
                session.replies.append(b"221 2.0.0 Bye\r\n")
                self._flush(sock, session)
                return
            else:
                self._answer(sock, session, 502, "5.5.2 unknown")

    def _ehlo_lines(self, verb: str) -> bytes:
        if verb == "HELO":
            return b"250 scripted\r\n"
        lines = ["scripted", "8BITMIME"]
        lines += ["PIPELINING"] if self.pipelining else []
        lines += ["CHUNKING"] if self.chunking else []
        return b"".join(
            f"250{'-' if at < len(lines) - 1 else ' '}{text}\r\n".encode()
            for at, text in enumerate(lines)
        )

    def _bdat(self, sock: socket.socket, session: _Session, chunk: bytes, *, last: bool) -> None:
        if not session.recipients:
            self._answer(sock, session, 554, "5.5.1 no valid recipients")
            return
        code, text = self._scripted("BDAT", (250, f"2.0.0 {len(chunk)} octets"))
        if not 200 <= code < 300:
            session.sender, session.recipients, session.content = False, 0, bytearray()
            self._answer(sock, session, code, text)
            return
        session.content += chunk
        if not last:
            self._answer(sock, session, code, text)
            return
        self._end_mail(sock, session, bytes(session.content), None)

    def _end_mail(
        self, sock: socket.socket, session: _Session, content: bytes, verb: str | None
    ) -> None:
        code, text = self._scripted(verb, (250, "2.0.0 queued")) if verb else (250, "2.0.0 queued")
        if 200 <= code < 300:
            with self._changed:
                self.messages.append(content)
                self._changed.notify_all()
        session.sender, session.recipients, session.content = False, 0, bytearray()
        self._answer(sock, session, code, text)
