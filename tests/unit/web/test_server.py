"""worker.web.server: uvicorn in a thread, bound before it serves."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from worker.errors import ConfigError
from worker.web.server import WebServer


async def hello(request: Request) -> PlainTextResponse:
    del request
    return PlainTextResponse("hello")


def test_it_serves_from_its_thread_until_stopped() -> None:
    server = WebServer(Starlette(routes=[Route("/", hello)]), host="127.0.0.1", port=0)
    server.start()
    try:
        address = server.address
        assert address is not None and address[1] != 0  # the port is known at once
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{address[1]}/", timeout=5) as response:
            assert response.read() == b"hello"
            assert "server" not in {name.lower() for name in response.headers}
    finally:
        server.stop()
    with pytest.raises(OSError), socket.create_connection(address, timeout=2):
        pass


def test_a_busy_port_is_a_configuration_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = WebServer(Starlette(), host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(ConfigError) as caught:
            server.start()
    assert caught.value.variable == "INVOICE_RELAY_WEB_PORT"
    server.stop()  # nothing started: stopping is harmless
