"""Composition root: parse the command, build settings, adapters and the pipeline.

Expected failures end as one line on stderr (never a traceback, never a secret) with
the exit status the README promises ("Commands"): 0 done, 1 a server or the database unavailable,
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

from worker.cli import audit, checks
from worker.cli.admin import load_logged, maintain
from worker.config.routes import Deployment, Route
from worker.errors import (
    ConfigError,
    ConfigProblems,
    DestinationAmbiguous,
    InfrastructureError,
    RelayError,
)
from worker.logs import configure_logging
from worker.models import (
    Outcome,
    PollReport,
    SightingKind,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE = 0, 1, 2


def _version() -> str:
    try:
        return version("invoice-relay")
    except PackageNotFoundError:
        return "0+unknown"


def _iso_date(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(text), time())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoice-relay",
        description="Forward each distinct invoice PDF from a shared mailbox once, "
        "and keep an audit log.",
    )
    parser.add_argument("--version", action="version", version=f"invoice-relay {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    once = commands.add_parser("once", help="one poll-and-forward cycle, then exit")
    once.add_argument(
        "--dry-run", action="store_true", help="print what would be forwarded; change nothing"
    )
    once.add_argument("--route", metavar="NAME", help="poll only this route")
    commands.add_parser("run", help="the service: poll on INVOICE_RELAY_SCHEDULE")

    check = commands.add_parser("check", help="try the IMAP, SMTP and database settings")
    check.add_argument("--send-test", metavar="ADDRESS", help="also send one test mail there")
    check.add_argument("--route", metavar="NAME", help="check only this route")

    audit_cmd = commands.add_parser("audit", help="print the audit log")
    audit_cmd.add_argument("--format", choices=sorted(audit.FORMATTERS), default="table")
    audit_cmd.add_argument("--since", type=_iso_date, help="rows received on or after (ISO)")
    audit_cmd.add_argument(
        "--outcome",
        action="append",
        choices=[o.value for o in Outcome],
        help="only these outcomes (repeatable)",
    )
    audit_cmd.add_argument("--invoice", help="only rows with this invoice number")
    audit_cmd.add_argument(
        "--limit", type=_positive_int, default=None, help="at most this many rows"
    )
    audit_cmd.add_argument("--route", metavar="NAME", help="only rows of this route")

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", help="apply migrations")

    retry = commands.add_parser("retry", help="put failed documents back to pending")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("sha256", nargs="?", help="the document's SHA-256")
    target.add_argument("--all", action="store_true", help="every failed document")
    _scope_arguments(retry)

    resend = commands.add_parser("resend", help="forward one document again, on purpose")
    resend.add_argument("sha256")
    _scope_arguments(resend)

    purge = commands.add_parser(
        "purge", help="delete a removed route's documents and sightings (offboarding)"
    )
    purge.add_argument("--route", metavar="NAME", required=True, help="the route's name")
    purge.add_argument(
        "--before", type=_iso_date, help="only what was received before this date (ISO)"
    )

    oauth = commands.add_parser("oauth", help="OAuth2 logins (docs/oauth.md)")
    oauth_commands = oauth.add_subparsers(
        dest="oauth_command", required=True, metavar="OAUTH_COMMAND"
    )
    oauth_status = oauth_commands.add_parser(
        "status", help="each login's flow and its token's age, no secrets"
    )
    oauth_login = oauth_commands.add_parser(
        "login", help="sign in (delegated flow) and store the refresh token"
    )
    for sub in (oauth_status, oauth_login):
        sub.add_argument("--route", metavar="NAME", help="only this route's login")

    health = commands.add_parser("healthcheck", help="exit 0 when the local service is alive")
    health.add_argument("--ready", action="store_true", help="ask /healthz instead of /livez")
    return parser


def _scope_arguments(command: argparse.ArgumentParser) -> None:
    scope = command.add_mutually_exclusive_group()
    scope.add_argument("--route", metavar="NAME", help="only documents this route introduced")
    scope.add_argument("--destination", metavar="NAME", help="only documents bound there")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, environ)
    except ConfigProblems as exc:
        for problem in exc.problems:  # one clear line per problem
            _fail(f"configuration error: {problem.variable}: {problem.problem}")
        return EXIT_USAGE
    except ConfigError as exc:
        _fail(f"configuration error: {exc.variable}: {exc.problem}")
        return EXIT_USAGE
    except DestinationAmbiguous as exc:  # a usage error: say which (--route, --destination)
        _fail(str(exc))
        return EXIT_USAGE
    except InfrastructureError as exc:
        _fail(str(exc))
        return EXIT_UNAVAILABLE
    except RelayError as exc:
        _fail(str(exc))
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _fail(line: str) -> None:
    print(f"invoice-relay: {line}", file=sys.stderr)


def _dispatch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from worker.cli import maintenance  # heavy: only when a command runs

    command: str = args.command
    if command == "healthcheck":
        return maintenance.healthcheck(environ, ready=args.ready)
    if command in ("audit", "db", "retry", "resend", "purge"):
        configure_logging("text" if sys.stderr.isatty() else "json", level=logging.WARNING)
        return maintain(args, environ)
    deployment = load_logged(environ)
    if command == "oauth":
        return _oauth(args, deployment)
    routes = deployment.select(getattr(args, "route", None))
    if command == "check":
        return checks.check_routes(deployment, routes, send_test=args.send_test, out=sys.stdout)
    if command == "run":
        from worker.cli import fleetrun

        return fleetrun.run_deployment(deployment)
    if args.dry_run:
        return _dry_run(routes)
    return _once(deployment, routes)


def _oauth(args: argparse.Namespace, deployment: Deployment) -> int:
    from worker.cli import maintenance

    routes = deployment.select(args.route)
    if args.oauth_command == "login":
        if len(routes) != 1:
            raise ConfigError("route", "say which route signs in: oauth login --route NAME")
        user = maintenance.oauth_login(routes[0].settings, show=print, pasted=sys.stdin.readline)
        print(f"stored a refresh token for {user}; `invoice-relay oauth status` shows it")
        return EXIT_OK
    for route in routes:
        for line in maintenance.oauth_status(route.settings):
            print(line if deployment.config_file is None else f"route {route.name}: {line}")
    return EXIT_OK


def _dry_run(routes: Sequence[Route]) -> int:
    from worker.cli import polling

    for route in routes:
        planned = polling.dry_run(
            route.settings, route=route.name, destination_name=route.destination
        )
        prefix = "" if len(routes) == 1 else f"route {route.name}: "
        for item in planned:
            verb = "would forward" if item.kind is SightingKind.DOCUMENT else item.kind.value
            print(
                f"{prefix}uid {item.uid} part {item.part or '-'}: {verb}"
                f"{' ' + item.filename if item.filename else ''}"
                f"{' (' + item.reason + ')' if item.reason else ''}"
            )
        forwards = sum(item.kind is SightingKind.DOCUMENT for item in planned)
        print(
            f"{prefix}dry run: {forwards} PDF(s) would be forwarded; nothing was recorded or sent"
        )
    return EXIT_OK


def _once(deployment: Deployment, routes: Sequence[Route]) -> int:
    from worker.cli import polling, routing

    progress = _progress_printer(sys.stderr)
    if deployment.config_file is None:  # one route from the environment, as ever
        report = polling.once(routes[0].settings, progress=progress)
        if progress is not None:
            sys.stderr.write("\n")  # end the progress line before the summary
        print(summary_line(report))
        return EXIT_OK
    outcomes = routing.once_each(deployment, routes, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    failed = 0
    for outcome in outcomes:
        if outcome.report is not None:
            print(f"route {outcome.route}: {summary_line(outcome.report)}")
        else:
            failed += 1
            _fail(f"route {outcome.route}: {outcome.error}")
    return EXIT_UNAVAILABLE if failed else EXIT_OK


def _progress_printer(stream: TextIO) -> Callable[[str], None] | None:
    if not stream.isatty():
        return None
    lock = threading.Lock()

    def show(text: str) -> None:
        with lock:
            stream.write(f"\r{text:<60}")
            stream.flush()

    return show


_SUMMARY_WORDS = {
    Outcome.PENDING: "new invoice(s)",
    Outcome.DUPLICATE: "duplicate(s)",
    Outcome.REJECTED: "rejected",
    Outcome.ERROR: "error(s), retried later",
    Outcome.NO_PDF: "without PDF",
}


def summary_line(report: PollReport) -> str:
    if report.locked:
        return "another replica is polling this mailbox; nothing done"
    found = ", ".join(
        f"{report.sightings[outcome]} {words}"
        for outcome, words in _SUMMARY_WORDS.items()
        if report.sightings.get(outcome)
    )
    return (
        f"read {report.mails_seen} new mail(s){': ' + found if found else ''}; "
        f"forwarded {report.forwarded}, waiting to be sent {report.pending}, "
        f"newly failed {report.failed}"
    )
