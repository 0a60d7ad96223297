"""Health of the service: the pure verdict, the HTTP endpoints, and the client probe.

`judge_health` decides whether `/healthz` says 200 or 503 for one route polled by
this process; `judge_route` and `judge_process` decide it for many routes, from every
replica's polls as the database keeps them; `HealthServer` serves
`/livez`, `/healthz` and `/metrics` for any `HealthSource` (the `Service`);
`probe_health` is the client side, for `invoice-relay healthcheck`.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from worker.errors import ConfigError, RelayError
from worker.models import RoutePollState
from worker.service.metrics import CONTENT_TYPE

_LOG = logging.getLogger(__name__)


# --- pure decisions --------------------------------------------------------------------


class HealthStatus(enum.Enum):
    STARTING = "starting"  # no poll has finished yet
    OK = "ok"  # the last successful poll is recent enough
    STALE = "stale"  # no successful poll within `healthy_after_seconds`
    DEGRADED = "degraded"  # the process works and some route is healthy, others are not
    UNAVAILABLE = "unavailable"  # the process cannot work: database or scheduler down


_SERVING = frozenset({HealthStatus.OK, HealthStatus.DEGRADED})


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
        """`/healthz` answers 200 (else 503)."""
        return self.status in _SERVING


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


def judge_route(
    state: RoutePollState | None,
    *,
    now: datetime,
    healthy_after_seconds: float,
    running_since: datetime,
) -> HealthVerdict:
    """One route, judged by its latest successful poll by any replica (`state`, from
    the database): a replica that loses every claim to its peers still sees the route
    healthy. A route never polled is starting for one window after this process
    started, then stale."""
    if state is None:
        if (now - running_since).total_seconds() <= healthy_after_seconds:
            return HealthVerdict(status=HealthStatus.STARTING, reason="not polled yet")
        return HealthVerdict(
            status=HealthStatus.STALE,
            reason=f"never polled (limit {healthy_after_seconds:g} s)",
        )
    if state.last_success_at is None:
        return HealthVerdict(status=HealthStatus.STALE, reason="no poll has succeeded yet")
    age = (now - state.last_success_at).total_seconds()
    if age > healthy_after_seconds:
        return HealthVerdict(
            status=HealthStatus.STALE,
            reason=f"no successful poll for {age:.0f} s (limit {healthy_after_seconds:g} s)",
        )
    return HealthVerdict(status=HealthStatus.OK)


def judge_process(
    *,
    database_error: str | None,
    scheduler_running: bool,
    routes: Mapping[str, HealthVerdict],
) -> HealthVerdict:
    """The whole process: unavailable (503) when it cannot work, starting or stale (503)
    when no route is healthy, degraded (200) when some are, else ok."""
    if database_error is not None:
        return HealthVerdict(
            status=HealthStatus.UNAVAILABLE, reason=f"database unreachable: {database_error}"
        )
    if not scheduler_running:
        return HealthVerdict(status=HealthStatus.UNAVAILABLE, reason="scheduler not running")
    healthy = sum(1 for verdict in routes.values() if verdict.ok)
    if healthy == 0:
        if routes and all(v.status is HealthStatus.STARTING for v in routes.values()):
            return HealthVerdict(status=HealthStatus.STARTING, reason="no route polled yet")
        return HealthVerdict(status=HealthStatus.STALE, reason="no route is healthy")
    if healthy < len(routes):
        return HealthVerdict(
            status=HealthStatus.DEGRADED,
            reason=f"{len(routes) - healthy} of {len(routes)} routes unhealthy",
        )
    return HealthVerdict(status=HealthStatus.OK)


def process_body(
    verdict: HealthVerdict,
    routes: Mapping[str, HealthVerdict],
    states: Mapping[str, RoutePollState],
) -> dict[str, object]:
    """The JSON document `/healthz` answers for a process serving several routes: the
    unhealthy routes are listed, the healthy ones only counted."""
    body: dict[str, object] = {
        "status": verdict.status.value,
        "routes": len(routes),
        "healthy": sum(1 for route in routes.values() if route.ok),
        "unhealthy": [
            _route_entry(name, route, states.get(name))
            for name, route in sorted(routes.items())
            if not route.ok
        ],
    }
    if verdict.reason is not None:
        body["reason"] = verdict.reason
    return body


def route_body(
    name: str, verdict: HealthVerdict, state: RoutePollState | None
) -> dict[str, object]:
    """The JSON document `/healthz?route=NAME` answers."""
    body = _route_entry(name, verdict, state)
    if state is not None:
        body["last_poll_at"] = _iso(state.last_finished_at)
        body["last_result"] = state.last_result
        body["polled_by"] = state.owner
    return body


def _route_entry(
    name: str, verdict: HealthVerdict, state: RoutePollState | None
) -> dict[str, object]:
    entry: dict[str, object] = {
        "route": name,
        "status": verdict.status.value,
        "last_success": _iso(state.last_success_at) if state is not None else None,
        "last_error": state.last_error if state is not None else None,
    }
    if verdict.reason is not None:
        entry["reason"] = verdict.reason
    return entry


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


class UnknownRoute(LookupError):
    """`/healthz?route=NAME` named no route this process serves (a 404)."""

    def __init__(self, route: str) -> None:
        super().__init__(f"unknown route {route!r}")
        self.route = route


class HealthSource(Protocol):
    """What the endpoints ask; `worker.service.runner.Service` (one route) and
    `worker.service.fleetservice.FleetService` (many) answer."""

    def liveness(self) -> tuple[bool, str]: ...

    def health(self, route: str | None = None) -> tuple[HealthVerdict, dict[str, object]]:
        """The process's health, or one route's; `UnknownRoute` for a name not served."""

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
        path, _, query = self.path.partition("?")
        source = self.server.source
        if path == "/livez":
            alive, text = source.liveness()
            self._answer(200 if alive else 503, f"{text}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/healthz":
            route = _route_asked(query)
            try:
                verdict, body = source.health(route)
            except UnknownRoute as exc:
                status, body = 404, {"error": str(exc)}
            else:
                status = 200 if verdict.ok else 503
            payload = json.dumps(body, sort_keys=True).encode() + b"\n"
            self._answer(status, payload, "application/json")
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


def _route_asked(query: str) -> str | None:
    values = urllib.parse.parse_qs(query).get("route")
    return values[-1] if values else None


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
