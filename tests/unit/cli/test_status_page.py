"""worker.cli.serve.status_page: `run` serves the page only when a web user is set."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from tests.unit.web.test_rules import BASE
from worker.cli.serve import status_page
from worker.config.settings import Settings
from worker.models import PollStatus
from worker.store.engine import create_schema
from worker.store.sqlstore import SqlStore
from worker.web.server import WebServer

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status_of(url: str) -> int:
    try:
        with _OPENER.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def test_no_web_user_serves_no_page(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    try:
        assert status_page(Settings.from_env(BASE), store, PollStatus) == ()
    finally:
        store.close()


def test_a_web_user_gets_the_page_on_its_own_port(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    settings = Settings.from_env(
        BASE
        | {
            "INVOICE_RELAY_WEB_PASSWORD": "correct horse",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
            "INVOICE_RELAY_WEB_PORT": "0",  # 0 is "off": the test binds its own below
        }
    )
    assert settings.web is None
    settings = Settings.from_env(
        BASE
        | {
            "INVOICE_RELAY_WEB_PASSWORD": "correct horse",
            "INVOICE_RELAY_SECRET_KEY_FILE": str(key),
        }
    )
    assert settings.web is not None
    store = SqlStore(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(store.engine)
    try:
        (server,) = status_page(settings, store, PollStatus)
        assert isinstance(server, WebServer)
        # The configured 8081 may be taken on a shared machine: the same app on port 0.
        served = WebServer(server.app, host="127.0.0.1", port=0)
        served.start()
        try:
            address = served.address
            assert address is not None
            base = f"http://127.0.0.1:{address[1]}"
            assert status_of(base + "/login") == 200
            assert status_of(base + "/livez") == 404
        finally:
            served.stop()
    finally:
        store.close()
