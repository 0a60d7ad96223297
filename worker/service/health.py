"""Health of the service: the pure verdict, the HTTP endpoints, and the client probe.

`judge_health` decides whether `/healthz` says 200 or 503; `HealthServer` serves
`/livez`, `/healthz` and `/metrics` for any `HealthSource` (the `Service`);
`probe_health` is the client side, for `invoice-relay healthcheck`.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from worker.errors import ConfigError, RelayError
from worker.service.metrics import CONTENT_TYPE

_LOG = logging.getLogger(__name__)


# --- pure decisions --------------------------------------------------------------------


class HealthStatus(enum.Enum):
    STARTING = "starting"  # no poll has finished yet
    OK = "ok"  # the last successful poll is recent enough
    STALE = "stale"  # no successful poll within `healthy_after_seconds`


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthSnapshot:
    """What the service knows about its polls at one moment."""

    polls_finished: int = 0  # polls that returned or raised
    last_success: datetime | None = None
    last_error: str | None = None  # the latest failure, kept after later successes
    last_error_at: datetime | None = None
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthVerdict:
    status: HealthStatus
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is HealthStatus.OK


def judge_health(
    snapshot: HealthSnapshot, *, now: datetime, healthy_after_seconds: float
) -> HealthVerdict:
    """Healthy while the last successful poll is at most `healthy_after_seconds` old."""
    if snapshot.polls_finished == 0:
        return HealthVerdict(status=HealthStatus.STARTING, reason="the first poll has not finished")
    if snapshot.last_success is None:
        return HealthVerdict(status=HealthStatus.STALE, reason="no poll has succeeded yet")
    age = (now - snapshot.last_success).total_seconds()
    if age > healthy_after_seconds:
        return HealthVerdict(
            status=HealthStatus.STALE,
            reason=f"no successful poll for {age:.0f} s (limit {healthy_after_seconds:g} s)",
        )
    return HealthVerdict(status=HealthStatus.OK)


def health_body(snapshot: HealthSnapshot, verdict: HealthVerdict) -> dict[str, object]:
    """The JSON document `/healthz` answers with."""
    body: dict[str, object] = {
        "status": verdict.status.value,
        "last_success": _iso(snapshot.last_success),
        "last_error": snapshot.last_error,
        "last_error_at": _iso(snapshot.last_error_at),
        "pending": snapshot.pending,
        "failed": snapshot.failed,
    }
    if verdict.reason is not None:
        body["reason"] = verdict.reason
    return body


def describe_error(error: Exception) -> str:
    """A text for `/healthz`: our own errors are written to be shown (no secrets);
    anything else may carry anything, so only its type is shown."""
    if isinstance(error, RelayError):
        return str(error)
    return f"unexpected {type(error).__name__} (see the log)"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


# --- the endpoints ---------------------------------------------------------------------


class HealthSource(Protocol):
    """What the endpoints ask; `worker.service.runner.Service` answers."""

    def liveness(self) -> tuple[bool, str]: ...

    def health(self) -> tuple[HealthVerdict, dict[str, object]]: ...

    def render_metrics(self) -> bytes: ...


class HealthServer(ThreadingHTTPServer):
    """`/livez`, `/healthz` and `/metrics` of one `HealthSource`, in daemon threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], source: HealthSource) -> None:
        self.source = source
        super().__init__(address, _HealthHandler)

    @classmethod
    def start(cls, host: str, port: int, source: HealthSource) -> HealthServer:
        """Bind and serve in a background thread; a port that cannot be bound is a
        configuration error naming INVOICE_RELAY_HTTP_PORT."""
        try:
            server = cls((host, port), source)
        except OSError as exc:
            raise ConfigError(
                "INVOICE_RELAY_HTTP_PORT",
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            ) from exc
        threading.Thread(
            # A short poll interval keeps shutdown() quick.
            target=lambda: server.serve_forever(poll_interval=0.2),
            name="invoice-relay-http",
            daemon=True,
        ).start()
        return server

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _HealthHandler(BaseHTTPRequestHandler):
    server: HealthServer
    timeout = 10  # a client that stalls mid-request does not keep a thread forever
    server_version = "invoice-relay"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        source = self.server.source
        if path == "/livez":
            alive, text = source.liveness()
            self._answer(200 if alive else 503, f"{text}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/healthz":
            verdict, body = source.health()
            payload = json.dumps(body, sort_keys=True).encode() + b"\n"
            self._answer(200 if verdict.ok else 503, payload, "application/json")
        elif path == "/metrics":
            self._answer(200, source.render_metrics(), CONTENT_TYPE)
        else:
            self._answer(404, b"not found\n", "text/plain; charset=utf-8")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit these endpoints every few seconds: keep them out of the normal log.
        _LOG.debug(format, *args, extra={"action": "http_request"})


# --- the client side, for `invoice-relay healthcheck` -----------------------------------


def probe_health(
    port: int, *, ready: bool = False, host: str = "127.0.0.1", timeout: float = 3.0
) -> tuple[bool, str]:
    """GET `/livez` (or `/healthz` when `ready`) of a local service: (True, body) on 200,
    else (False, why)."""
    path = "/healthz" if ready else "/livez"
    netloc = f"[{host}]" if ":" in host else host
    url = f"http://{netloc}:{port}{path}"
    # No proxy: HTTP_PROXY in a container's environment must not catch a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(4096).decode("utf-8", "replace").strip()
            return True, body
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(4096).decode("utf-8", "replace").strip()
        return False, f"{url} answered {exc.code}: {body}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"cannot reach {url}: {reason}"
