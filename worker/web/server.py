"""uvicorn serving the status page from a thread of `run`, with its own event loop."""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from starlette.types import ASGIApp

from worker.errors import ConfigError

log = logging.getLogger(__name__)

_STOP_TIMEOUT = 5  # seconds for open requests to finish at shutdown


class WebServer:
    """`start()` binds the port at once (so the address is known, and a busy port is a
    `ConfigError` naming INVOICE_RELAY_WEB_PORT there and then) and serves in a daemon
    thread; `stop()` asks uvicorn to finish."""

    def __init__(self, app: ASGIApp, *, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def app(self) -> ASGIApp:
        return self._app

    @property
    def address(self) -> tuple[str, int] | None:
        if self._socket is None:
            return None
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listening.bind((self._host, self._port))
            listening.listen(128)
        except OSError as exc:
            listening.close()
            raise ConfigError(
                "INVOICE_RELAY_WEB_PORT",
                f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}",
            ) from exc
        self._socket = listening
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan="off",
            proxy_headers=False,  # worker.web.auth.client_address decides whom to trust
            server_header=False,
            access_log=False,
            timeout_graceful_shutdown=_STOP_TIMEOUT,
        )
        server = uvicorn.Server(config)
        self._server = server
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [listening]},
            name="invoice-relay-web",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        address = self.address
        log.info("status page on %s:%s", *(address or ("?", "?")), extra={"action": "web_started"})

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT + 1.0)
        if self._socket is not None:
            self._socket.close()
