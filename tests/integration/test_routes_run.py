"""`run` with a routes file: every (route, fire time) polled by one replica, health and
metrics per route, as a user runs it (subprocesses, Dovecot, the sink, PostgreSQL)."""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from tests.integration.guarantee_tools import invoices, sql_rows
from tests.integration.test_relay import run_relay
from tests.integration.test_routes import (
    INBOX_ONE,
    INBOX_TWO,
    USERS,
    by_recipient,
    ca_bundle,
    deliver,
    file_env,
    routes_file,
    sqlite_routes,
)
from tests.integration.test_service_run import free_port, get, running_relay, samples_of
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import temporary_database
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA

ROUTES = {
    "shop-a": (USERS["shop-a"], INBOX_ONE),
    "shop-b": (USERS["shop-b"], INBOX_ONE),
    "shop-c": (USERS["shop-c"], INBOX_TWO),
}


def logins(imap: DovecotServer) -> Counter[str]:
    """IMAP logins per user, from Dovecot's log."""
    return Counter(re.findall(r"imap-login: (?:Info: )?Login: user=<([^>]+)>", imap.log()))


def ready(port: int) -> bool:
    """Every route healthy: each one's poll finished and recorded, by either replica."""
    status, body = get(port, "/healthz")
    return status == 200 and json.loads(body).get("status") == "ok"


def errors(port: int, route: str) -> float:
    metrics = samples_of(get(port, "/metrics")[1])
    return metrics.get(f'invoice_relay_polls_total{{result="error",route="{route}"}}', 0.0)


def actions(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_two_replicas_of_run_poll_each_route_once_per_fire_time(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    with temporary_database() as database_url:
        config = routes_file(
            tmp_path, imap, smtp, database_url, ca_bundle(imap, smtp, smtp_ca, database_url), ROUTES
        )
        # Once a year: the only fire time in the test is the latest past one, which each
        # replica tries to claim at start-up.
        config.write_text(
            config.read_text().replace("[defaults]", '[defaults]\nschedule = "0 0 1 1 *"')
        )
        made = {name: invoices(3, first=9000 + 100 * i) for i, name in enumerate(ROUTES)}
        for name, (user, _) in ROUTES.items():
            deliver(imap, user, made[name])
        delivered = logins(imap)  # the test's own APPENDs log in too
        ports = [free_port(), free_port()]
        with ExitStack() as stack:
            relays = [
                stack.enter_context(
                    running_relay(
                        {**file_env(imap, smtp, config), "INVOICE_RELAY_HTTP_PORT": str(port)},
                        tmp_path / f"run-{index}.log",
                        port,
                    )
                )
                for index, port in enumerate(ports)
            ]
            relays[0].wait_until(lambda: len(smtp.messages) == 9, 60, "every invoice forwarded")
            for relay in relays:
                relay.wait_until(partial(ready, relay.port), 30, "/healthz ok")
            # Both replicas judge every route by its last poll by either of them.
            for relay in relays:
                body = json.loads(get(relay.port, "/healthz")[1])
                assert body["status"] == "ok", body
                status, one = get(relay.port, "/healthz?route=shop-b")
                assert status == 200 and json.loads(one)["route"] == "shop-b", one
                assert get(relay.port, "/healthz?route=no-such-route")[0] == 404
            metrics = [samples_of(get(relay.port, "/metrics")[1]) for relay in relays]
            codes = [relay.terminate() for relay in relays]
        assert codes == [0, 0]

        expected = Counter(
            {
                (INBOX_TWO if name == "shop-c" else INBOX_ONE, invoice.sha256): 1
                for name, route_invoices in made.items()
                for invoice in route_invoices
            }
        )
        assert by_recipient(smtp.messages) == expected
        lines = [line for relay in relays for line in actions(relay.log())]
        started = Counter(
            str(line["route"])
            for line in lines
            if line.get("action") == "poll_started" and line.get("fire_time")
        )
        skipped = Counter(
            str(line["route"]) for line in lines if line.get("action") == "poll_skipped"
        )
        # One poll per route for the fire time; the other replica logged it skipped.
        assert started == Counter(dict.fromkeys(ROUTES, 1)), started
        assert skipped == Counter(dict.fromkeys(ROUTES, 1)), skipped
        # One IMAP login per route for that fire time, counted by Dovecot.
        relayed = logins(imap) - delivered
        assert relayed == Counter(dict.fromkeys((user for user, _ in ROUTES.values()), 1)), relayed
        for name in ROUTES:
            polls = sum(
                m.get(f'invoice_relay_polls_total{{result="ok",route="{name}"}}', 0)
                for m in metrics
            )
            assert polls == 1, (name, polls)


def test_a_broken_route_is_listed_unhealthy_while_the_process_stays_ready(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    _database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {"shop-a": ROUTES["shop-a"], "shop-b": ROUTES["shop-b"]},
    )
    (tmp_path / "wrong-password").write_text("not-the-password\n")
    (tmp_path / "wrong-password").chmod(0o600)
    # A short health window for the broken route: how long a route may go without a
    # successful poll is the user's choice (INVOICE_RELAY_HEALTHY_AFTER), not a fault
    # default; the working route keeps the default.
    config.write_text(
        config.read_text().replace(
            'name = "shop-b"',
            'name = "shop-b"\nimap_password_file = "wrong-password"\nhealthy_after = "2s"',
        )
    )
    deliver(imap, USERS["shop-a"], invoices(1, first=9500))
    port = free_port()
    env = {**file_env(imap, smtp, config), "INVOICE_RELAY_HTTP_PORT": str(port)}
    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(lambda: len(smtp.messages) == 1, 60, "shop-a's invoice forwarded")
        relay.wait_until(
            lambda: get(port, "/healthz?route=shop-b")[0] == 503, 30, "shop-b unhealthy"
        )
        status, body = get(port, "/healthz")
        assert status == 200, body  # the process can work: one route is healthy
        listed = json.loads(body)
        assert "shop-b" in json.dumps(listed.get("unhealthy", listed)), listed
        assert get(port, "/healthz?route=shop-a")[0] == 200
        relay.wait_until(lambda: errors(port, "shop-b") >= 1, 30, "shop-b's failed poll counted")
        metrics = samples_of(get(port, "/metrics")[1])
        assert metrics['invoice_relay_polls_total{result="ok",route="shop-a"}'] == 1
        assert metrics['invoice_relay_polls_total{result="error",route="shop-a"}'] == 0
        assert relay.terminate() == 0
    failed = [line for line in actions(relay.log()) if line.get("action") == "poll_failed"]
    assert failed and all(line.get("route") == "shop-b" for line in failed), failed


def test_twelve_routes_poll_in_parallel_on_one_sqlite_file(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    # The default of 8 polls at once, all writing to one SQLite file: WAL, busy_timeout
    # and BEGIN IMMEDIATE keep "database is locked" from ever reaching a poll.
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    routes = {f"shop-{n:02d}": (f"shop-{n:02d}@shop.example", INBOX_ONE) for n in range(12)}
    config = routes_file(
        tmp_path, imap, smtp, database_url, ca_bundle(imap, smtp, smtp_ca, database_url), routes
    )
    made = {name: invoices(2, first=10_000 + 10 * n) for n, name in enumerate(routes)}
    for name, (user, _) in routes.items():
        deliver(imap, user, made[name])
    port = free_port()
    env = {**file_env(imap, smtp, config), "INVOICE_RELAY_HTTP_PORT": str(port)}
    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(lambda: len(smtp.messages) == 24, 120, "every invoice forwarded")
        relay.wait_until(partial(ready, port), 60, "every route healthy")
        assert relay.terminate() == 0
    lines = actions(relay.log())
    assert not [line for line in lines if line.get("action") == "poll_failed"]
    assert "database is locked" not in relay.log()
    started = {str(line["route"]) for line in lines if line.get("action") == "poll_started"}
    assert started == set(routes)
    assert by_recipient(smtp.messages) == {
        (INBOX_ONE, invoice.sha256): 1 for batch in made.values() for invoice in batch
    }


def test_an_idle_route_is_watched_and_forwards_without_waiting_for_its_schedule(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    _database_url, config = sqlite_routes(
        tmp_path,
        imap,
        smtp,
        smtp_ca,
        {"shop-a": ROUTES["shop-a"], "shop-b": ROUTES["shop-b"]},
    )
    # A yearly schedule: after the start-up poll only IMAP IDLE can bring shop-a's mail.
    text = config.read_text().replace("[defaults]", '[defaults]\nschedule = "0 0 1 1 *"')
    config.write_text(text.replace('name = "shop-a"', 'name = "shop-a"\nidle = true'))
    port = free_port()
    env = {**file_env(imap, smtp, config), "INVOICE_RELAY_HTTP_PORT": str(port)}
    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(partial(ready, port), 60, "both start-up polls recorded")
        relay.wait_until(
            lambda: any(
                line.get("action") == "idle_started" or "IDLE" in str(line.get("message"))
                for line in actions(relay.log())
            ),
            30,
            "shop-a's IDLE watch",
        )
        late = invoices(1, first=9700)
        deliver(imap, USERS["shop-a"], late)
        relay.wait_until(lambda: len(smtp.messages) == 1, 30, "the announced mail forwarded")
        assert relay.terminate() == 0
    assert by_recipient(smtp.messages) == {(INBOX_ONE, late[0].sha256): 1}
    watched = {
        line.get("route") for line in actions(relay.log()) if "idle" in str(line.get("action"))
    }
    assert "shop-a" in watched and "shop-b" not in watched, watched


def test_purge_deletes_a_removed_routes_rows_and_refuses_a_configured_one(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'relay.db'}"
    bundle = ca_bundle(imap, smtp, smtp_ca, database_url)
    both = {"shop-a": ROUTES["shop-a"], "shop-b": ROUTES["shop-b"]}
    config = routes_file(tmp_path, imap, smtp, database_url, bundle, both)
    deliver(imap, USERS["shop-a"], invoices(1, first=9800))
    deliver(imap, USERS["shop-b"], invoices(2, first=9900))
    env = file_env(imap, smtp, config)
    assert run_relay(env, "once").returncode == 0

    refused = run_relay(env, "purge", "--route", "shop-b")
    assert refused.returncode == 2 and "still configured" in refused.stderr
    routes_file(tmp_path, imap, smtp, database_url, bundle, {"shop-a": ROUTES["shop-a"]})
    purged = run_relay(env, "purge", "--route", "shop-b")
    assert purged.returncode == 0, purged.stderr
    assert "deleted 2 sighting(s) and 2 document(s)" in purged.stdout
    left = sql_rows(database_url, "SELECT route, count(*) AS n FROM audit_log GROUP BY route")
    assert left == [{"route": "shop-a", "n": 1}]
    again = run_relay(env, "purge", "--route", "shop-b")
    assert again.returncode == 1 and "nothing recorded" in again.stdout
    # Renamed: shop-a's folder is now shop-alpha's. Purging the old name leaves the
    # live route's rows alone (it would read its folder again and resend everything).
    routes_file(tmp_path, imap, smtp, database_url, bundle, {"shop-alpha": ROUTES["shop-a"]})
    renamed = run_relay(env, "purge", "--route", "shop-a")
    assert "left alone, route shop-alpha polls it" in renamed.stdout, renamed.stdout
    assert sql_rows(database_url, "SELECT count(*) AS n FROM audit_log") == [{"n": 1}]
