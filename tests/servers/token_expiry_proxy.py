"""A loopback IMAP proxy that ends a session when the OAuth2 token it logged in with
expires, as Exchange Online does (`* BYE ... AccessTokenExpired`). Dovecot checks a token
only when it is presented, so without this proxy a session outlives its token.

It reads the SASL responses the client sends (XOAUTH2 and OAUTHBEARER carry
`auth=Bearer <token>`, base64-encoded, after AUTHENTICATE or as its initial response),
takes the JWT's `exp` without checking anything else (Dovecot checks), and cuts the
session then. `latency_seconds` delays each client write, as a server far away would,
so that a poll of a few hundred mails outlasts a short-lived token. Plain IMAP only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

import jwt

BYE = b"* BYE Session invalidated - AccessTokenExpired\r\n"
_BEARER = re.compile(rb"auth=Bearer ([A-Za-z0-9._~+/=-]+)")


def bearer_token(line: bytes) -> str | None:
    """The token in one client line that is (or ends with) a base64 SASL response."""
    words = line.strip().split()
    if not words:
        return None
    try:
        decoded = base64.b64decode(words[-1], validate=True)
    except (binascii.Error, ValueError):
        return None
    match = _BEARER.search(decoded)
    return match.group(1).decode() if match else None


class TokenExpiryProxy:
    def __init__(self, target_port: int, *, latency_seconds: float = 0.0) -> None:
        self.target_port = target_port
        self.latency_seconds = latency_seconds
        self.logins = 0  # sessions that presented a token
        self.ended = 0  # sessions cut because their token expired
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            server.settimeout(None)
            session = _Session(self, client, server)
            threading.Thread(target=session.to_server, daemon=True).start()
            threading.Thread(target=session.to_client, daemon=True).start()


class _Session:
    def __init__(self, proxy: TokenExpiryProxy, client: socket.socket, server: socket.socket):
        self._proxy = proxy
        self._client = client
        self._server = server
        self._timer: threading.Timer | None = None
        self._send_lock = threading.Lock()
        self._closed = False

    def to_server(self) -> None:
        pending = b""
        try:
            while data := self._client.recv(65536):
                if self._proxy.latency_seconds:
                    time.sleep(self._proxy.latency_seconds)  # the distance to the server
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._saw(line)
                self._server.sendall(data)
        except OSError:
            pass
        self._close()

    def to_client(self) -> None:
        try:
            while data := self._server.recv(65536):
                with self._send_lock:
                    if self._closed:
                        return
                    self._client.sendall(data)
        except OSError:
            pass
        self._close()

    def _saw(self, line: bytes) -> None:
        token = bearer_token(line)
        if token is None:
            return
        try:
            expires = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        except (jwt.PyJWTError, KeyError, ValueError):
            return
        with self._proxy._lock:
            self._proxy.logins += 1
        if self._timer is not None:
            self._timer.cancel()  # a retry with another token: its expiry counts
        self._timer = threading.Timer(max(expires - time.time(), 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            with self._proxy._lock:
                self._proxy.ended += 1
            with contextlib.suppress(OSError):
                self._client.sendall(BYE)
        self._close()

    def _close(self) -> None:
        with self._send_lock:
            self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for sock in (self._client, self._server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def running_expiry_proxy(
    target_port: int, *, latency_seconds: float = 0.0
) -> Iterator[TokenExpiryProxy]:
    proxy = TokenExpiryProxy(target_port, latency_seconds=latency_seconds)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
