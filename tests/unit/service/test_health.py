"""Health: the pure verdict, the JSON body, the endpoints over real loopback HTTP with a
fake source, the client probe, and `invoice-relay healthcheck`."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from worker.cli.maintenance import healthcheck
from worker.errors import ConfigError, MailboxError
from worker.models import RoutePollState
from worker.service.health import (
    HealthServer,
    HealthSnapshot,
    HealthStatus,
    HealthVerdict,
    UnknownRoute,
    describe_error,
    health_body,
    judge_health,
    judge_process,
    judge_route,
    probe_health,
    process_body,
    route_body,
)

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- pure decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snapshot", "age_seconds", "expected"),
    [
        (HealthSnapshot(), 0, HealthStatus.STARTING),
        (HealthSnapshot(), 10_000, HealthStatus.STARTING),
        (HealthSnapshot(polls_finished=1, last_error="IMAP down"), 0, HealthStatus.STALE),
        (HealthSnapshot(polls_finished=1, last_success=T0), 0, HealthStatus.OK),
        (HealthSnapshot(polls_finished=3, last_success=T0), 300, HealthStatus.OK),  # boundary
        (HealthSnapshot(polls_finished=3, last_success=T0), 301, HealthStatus.STALE),
        (
            HealthSnapshot(polls_finished=4, last_success=T0, last_error="IMAP down"),
            60,
            HealthStatus.OK,
        ),
    ],
)
def test_judge_health(snapshot: HealthSnapshot, age_seconds: int, expected: HealthStatus) -> None:
    verdict = judge_health(
        snapshot, now=T0 + timedelta(seconds=age_seconds), healthy_after_seconds=300
    )
    assert verdict.status is expected
    assert verdict.ok is (expected is HealthStatus.OK)
    assert (verdict.reason is None) is (expected is HealthStatus.OK)


def test_a_stale_reason_says_how_old_the_last_success_is() -> None:
    snapshot = HealthSnapshot(polls_finished=2, last_success=T0)
    verdict = judge_health(snapshot, now=T0 + timedelta(seconds=900), healthy_after_seconds=300)
    assert verdict.reason is not None
    assert "900 s" in verdict.reason
    assert "300 s" in verdict.reason


# --- many routes: judged by every replica's polls ------------------------------------


def poll_state(
    *, success_age: float | None, error: str | None = None, owner: str = "replica-b"
) -> RoutePollState:
    finished = T0 - timedelta(seconds=success_age if success_age is not None else 30)
    return RoutePollState(
        route="shop-a",
        last_started_at=finished - timedelta(seconds=2),
        last_finished_at=finished,
        last_success_at=None if success_age is None else finished,
        last_result="2 mails seen, 1 forwarded, 0 pending, 0 failed",
        last_error=error,
        owner=owner,
    )


@pytest.mark.parametrize(
    ("state", "uptime", "expected", "reason"),
    [
        (None, 10, HealthStatus.STARTING, "not polled yet"),
        (None, 300, HealthStatus.STARTING, "not polled yet"),  # boundary
        (None, 301, HealthStatus.STALE, "never polled (limit 300 s)"),
        (poll_state(success_age=None, error="IMAP down"), 10, HealthStatus.STALE, "succeeded"),
        (poll_state(success_age=0), 10, HealthStatus.OK, None),
        (poll_state(success_age=300), 10_000, HealthStatus.OK, None),  # boundary
        (poll_state(success_age=301), 10_000, HealthStatus.STALE, "301 s (limit 300 s)"),
        # Another replica's success counts: this one may have lost every claim.
        (poll_state(success_age=60, owner="replica-c"), 10_000, HealthStatus.OK, None),
        (poll_state(success_age=60, error="mail action"), 10_000, HealthStatus.OK, None),
    ],
)
def test_judge_route(
    state: RoutePollState | None, uptime: int, expected: HealthStatus, reason: str | None
) -> None:
    verdict = judge_route(
        state,
        now=T0,
        healthy_after_seconds=300,
        running_since=T0 - timedelta(seconds=uptime),
    )
    assert verdict.status is expected
    if reason is None:
        assert verdict.reason is None
    else:
        assert verdict.reason is not None
        assert reason in verdict.reason


OK = HealthVerdict(status=HealthStatus.OK)
STALE = HealthVerdict(status=HealthStatus.STALE, reason="old")
STARTING = HealthVerdict(status=HealthStatus.STARTING, reason="not polled yet")


@pytest.mark.parametrize(
    ("database_error", "scheduler", "routes", "expected", "code"),
    [
        (None, True, {"a": OK, "b": OK}, HealthStatus.OK, 200),
        (None, True, {"a": OK, "b": STALE}, HealthStatus.DEGRADED, 200),
        (None, True, {"a": OK, "b": STARTING}, HealthStatus.DEGRADED, 200),
        (None, True, {"a": STALE, "b": STALE}, HealthStatus.STALE, 503),
        (None, True, {"a": STARTING, "b": STALE}, HealthStatus.STALE, 503),
        (None, True, {"a": STARTING, "b": STARTING}, HealthStatus.STARTING, 503),
        (None, True, {}, HealthStatus.STALE, 503),
        ("connection refused", True, {"a": OK}, HealthStatus.UNAVAILABLE, 503),
        (None, False, {"a": OK}, HealthStatus.UNAVAILABLE, 503),
    ],
)
def test_judge_process(
    database_error: str | None,
    scheduler: bool,
    routes: dict[str, HealthVerdict],
    expected: HealthStatus,
    code: int,
) -> None:
    verdict = judge_process(
        database_error=database_error, scheduler_running=scheduler, routes=routes
    )
    assert verdict.status is expected
    assert verdict.ok is (code == 200)
    assert (verdict.reason is None) is (expected is HealthStatus.OK)


def test_judge_process_names_the_cause() -> None:
    down = judge_process(database_error="refused", scheduler_running=True, routes={"a": OK})
    assert down.reason == "database unreachable: refused"
    dead = judge_process(database_error=None, scheduler_running=False, routes={"a": OK})
    assert dead.reason == "scheduler not running"
    some = judge_process(
        database_error=None, scheduler_running=True, routes={"a": OK, "b": STALE, "c": STALE}
    )
    assert some.reason == "2 of 3 routes unhealthy"


def test_the_process_body_lists_only_the_unhealthy_routes() -> None:
    routes = {"shop-b": STALE, "shop-a": OK, "shop-c": STARTING}
    states = {"shop-b": replace(poll_state(success_age=900, error="IMAP down"), route="shop-b")}
    verdict = HealthVerdict(status=HealthStatus.DEGRADED, reason="2 of 3 routes unhealthy")
    assert process_body(verdict, routes, states) == {
        "status": "degraded",
        "reason": "2 of 3 routes unhealthy",
        "routes": 3,
        "healthy": 1,
        "unhealthy": [
            {
                "route": "shop-b",
                "status": "stale",
                "reason": "old",
                "last_success": "2025-06-01T11:45:00+00:00",
                "last_error": "IMAP down",
            },
            {
                "route": "shop-c",
                "status": "starting",
                "reason": "not polled yet",
                "last_success": None,
                "last_error": None,
            },
        ],
    }


def test_the_route_body_says_who_polled_last() -> None:
    body = route_body("shop-a", OK, poll_state(success_age=60))
    assert body == {
        "route": "shop-a",
        "status": "ok",
        "last_success": "2025-06-01T11:59:00+00:00",
        "last_error": None,
        "last_poll_at": "2025-06-01T11:59:00+00:00",
        "last_result": "2 mails seen, 1 forwarded, 0 pending, 0 failed",
        "polled_by": "replica-b",
    }
    assert route_body("shop-a", STARTING, None) == {
        "route": "shop-a",
        "status": "starting",
        "reason": "not polled yet",
        "last_success": None,
        "last_error": None,
    }


def test_health_body() -> None:
    snapshot = HealthSnapshot(
        polls_finished=2,
        last_success=T0,
        last_error="IMAP imap.example:993: down",
        last_error_at=T0 + timedelta(seconds=5),
        pending=3,
        failed=1,
    )
    body = health_body(snapshot, HealthVerdict(status=HealthStatus.STALE, reason="old"))
    assert body == {
        "status": "stale",
        "reason": "old",
        "last_success": "2025-06-01T12:00:00+00:00",
        "last_error": "IMAP imap.example:993: down",
        "last_error_at": "2025-06-01T12:00:05+00:00",
        "pending": 3,
        "failed": 1,
    }
    assert "reason" not in health_body(snapshot, HealthVerdict(status=HealthStatus.OK))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MailboxError("connection refused", host="imap.example", port=993), "imap.example:993"),
        (RuntimeError("password=hunter2"), "unexpected RuntimeError (see the log)"),
        (KeyError("hunter2"), "unexpected KeyError (see the log)"),
    ],
)
def test_describe_error_shows_our_errors_and_hides_foreign_text(
    error: Exception, expected: str
) -> None:
    text = describe_error(error)
    assert expected in text
    assert "hunter2" not in text


def test_probe_health_reports_a_closed_port() -> None:
    port = free_port()
    ok, reason = probe_health(port, timeout=1)
    assert ok is False
    assert f"127.0.0.1:{port}/livez" in reason


# --- the endpoints, with a fake source ---------------------------------------------------


@dataclass
class FakeSource:
    alive: bool = True
    verdict: HealthVerdict = field(default_factory=lambda: HealthVerdict(status=HealthStatus.OK))
    body: dict[str, object] = field(default_factory=lambda: {"status": "ok"})
    metrics: bytes = b"# a metric\n"
    routes: tuple[str, ...] = ("default", "shop-a")
    asked: list[str | None] = field(default_factory=list)

    def liveness(self) -> tuple[bool, str]:
        return (True, "ok") if self.alive else (False, "scheduler not running")

    def health(self, route: str | None = None) -> tuple[HealthVerdict, dict[str, object]]:
        self.asked.append(route)
        if route is not None and route not in self.routes:
            raise UnknownRoute(route)
        return self.verdict, self.body

    def render_metrics(self) -> bytes:
        return self.metrics


@pytest.fixture
def served() -> Iterator[tuple[FakeSource, int]]:
    source = FakeSource()
    server = HealthServer.start("127.0.0.1", 0, source)
    try:
        yield source, server.address[1]
    finally:
        server.stop()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str) -> tuple[int, bytes, str]:
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers["Content-Type"]


@pytest.mark.parametrize(
    ("alive", "path", "status", "body"),
    [
        (True, "/livez", 200, b"ok\n"),
        (False, "/livez", 503, b"scheduler not running\n"),
        (True, "/livez?verbose=1", 200, b"ok\n"),
        (True, "/metrics", 200, b"# a metric\n"),
        (True, "/", 404, b"not found\n"),
        (True, "/healthz/x", 404, b"not found\n"),
    ],
)
def test_endpoints(
    served: tuple[FakeSource, int], alive: bool, path: str, status: int, body: bytes
) -> None:
    source, port = served
    source.alive = alive
    assert get(port, path)[:2] == (status, body)


@pytest.mark.parametrize(("status", "code"), [(HealthStatus.OK, 200), (HealthStatus.STALE, 503)])
def test_healthz_answers_the_verdict_as_json(
    served: tuple[FakeSource, int], status: HealthStatus, code: int
) -> None:
    source, port = served
    source.verdict = HealthVerdict(status=status, reason=None if code == 200 else "old")
    source.body = {"status": status.value, "pending": 2}
    answer, body, content_type = get(port, "/healthz")
    assert (answer, content_type) == (code, "application/json")
    assert json.loads(body) == {"status": status.value, "pending": 2}


@pytest.mark.parametrize(
    ("path", "asked"),
    [
        ("/healthz", None),
        ("/healthz?route=shop-a", "shop-a"),
        ("/healthz?route=shop%2Da", "shop-a"),
        ("/healthz?verbose=1&route=default", "default"),
        ("/healthz?route=", None),
    ],
)
def test_healthz_passes_the_route_asked_for(
    served: tuple[FakeSource, int], path: str, asked: str | None
) -> None:
    source, port = served
    assert get(port, path)[0] == 200
    assert source.asked == [asked]


def test_healthz_for_an_unknown_route_is_404(served: tuple[FakeSource, int]) -> None:
    _source, port = served
    status, body, content_type = get(port, "/healthz?route=nobody")
    assert (status, content_type) == (404, "application/json")
    assert json.loads(body) == {"error": "unknown route 'nobody'"}


def test_a_port_in_use_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError) as caught:
            HealthServer.start("127.0.0.1", taken.getsockname()[1], FakeSource())
    assert caught.value.variable == "INVOICE_RELAY_HTTP_PORT"


# --- `invoice-relay healthcheck` ---------------------------------------------------------


@pytest.mark.parametrize(
    ("alive", "ready", "expected"),
    [(True, False, 0), (False, False, 1), (True, True, 0)],
)
def test_healthcheck_exit_status(
    served: tuple[FakeSource, int],
    capsys: pytest.CaptureFixture[str],
    alive: bool,
    ready: bool,
    expected: int,
) -> None:
    source, port = served
    source.alive = alive
    assert healthcheck({"INVOICE_RELAY_HTTP_PORT": str(port)}, ready=ready) == expected
    assert capsys.readouterr().out.strip()


def test_healthcheck_says_when_http_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck({"INVOICE_RELAY_HTTP_PORT": "0"}, ready=False) == 1
    line = capsys.readouterr().out.strip()
    assert "HTTP server is off" in line
    assert "INVOICE_RELAY_HTTP_PORT=0" in line


def test_healthcheck_on_a_closed_port_fails(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert healthcheck({"INVOICE_RELAY_HTTP_PORT": str(port)}, ready=False) == 1
    assert f"cannot reach http://127.0.0.1:{port}/livez" in capsys.readouterr().out
