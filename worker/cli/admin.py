"""The commands that keep the database: `audit`, `db upgrade`, `retry`, `resend` and
`purge`, and how the CLI reads the deployment (the routes file or the environment)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping

from worker.cli import audit
from worker.config.routes import Deployment, load_deployment
from worker.config.settings import Settings, database_url_from_env
from worker.errors import ConfigError
from worker.logs import configure_logging, register_secret, register_secrets
from worker.models import AuditFilter, DeliveryKind, DocumentScope, Outcome

log = logging.getLogger(__name__)

EXIT_OK, EXIT_UNAVAILABLE = 0, 1


def load_logged(environ: Mapping[str, str]) -> Deployment:
    # Lines logged while the file is read (a process setting overridden) need a handler
    # before the file says which format; the file's choice replaces it below.
    configure_logging("text" if sys.stderr.isatty() else "json")
    deployment = load_deployment(environ, stderr_is_tty=sys.stderr.isatty())
    configure_logging(deployment.process.log_format)
    for route in deployment.routes:
        register_secrets(route.settings.secret_values())
    for name in deployment.process.unknown_variables:
        log.warning("unknown setting %s ignored (a typo?)", name, extra={"action": "config"})
    return deployment


def _database(environ: Mapping[str, str]) -> tuple[str, Deployment | None]:
    """The database of the maintenance commands, and the routes file's deployment when
    there is one (read once): its `[relay]` names the database (the environment
    overrides it); without a file, the environment alone."""
    deployment: Deployment | None = None
    if environ.get("INVOICE_RELAY_CONFIG", "").strip():
        deployment = load_deployment(environ, stderr_is_tty=sys.stderr.isatty())
        for route in deployment.routes:
            register_secrets(route.settings.secret_values())
        url = deployment.process.database_url
    else:
        url = database_url_from_env(environ)
    register_secret(url.reveal())
    return url.reveal(), deployment


def maintain(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from worker.cli import maintenance

    command: str = args.command
    url, deployment = _database(environ)
    if command == "audit":
        query = AuditFilter(
            since=args.since,
            outcomes=tuple(Outcome(o) for o in args.outcome or ()),
            invoice_number=args.invoice,
            route=args.route,
            limit=args.limit,
        )
        rows = maintenance.audit_rows(url, query)
        sys.stdout.write(audit.FORMATTERS[args.format](rows))
        return EXIT_OK
    if command == "db":
        maintenance.upgrade(url)
        print("database is up to date")
        return EXIT_OK
    if command == "purge":
        # Without a file, the environment's one route (its folder is needed below).
        current = deployment or load_deployment(environ, stderr_is_tty=sys.stderr.isatty())
        configured = {route.name: route for route in current.routes}
        if args.route in configured:
            raise ConfigError(
                "route",
                f"{args.route} is still configured; remove it from the routes file first",
            )
        # A renamed route, or the environment's one moved into a file, polls the same
        # folder under a new name: that folder's rows are the live route's, not purged.
        polled = {route.mailbox: name for name, route in configured.items()}
        folders = maintenance.purge(url, args.route, before=args.before, keep=polled)
        for mailbox, counts in folders:
            said = (
                counts.describe()
                if counts is not None
                else f"left alone, route {polled[mailbox]} polls it"
            )
            print(f"route {args.route}, {mailbox}: {said}")
        if not any(counts is not None for _, counts in folders):
            print(f"route {args.route}: nothing recorded under that name")
            return EXIT_UNAVAILABLE
        return EXIT_OK
    scope = DocumentScope(route=args.route, destination=args.destination)
    if command == "retry":
        count = maintenance.retry(url, None if args.all else args.sha256, scope=scope)
        print(f"{count} document(s) queued again")
        return EXIT_OK if count or args.all else EXIT_UNAVAILABLE
    settings = _resend_settings(environ, deployment, url, args.sha256, scope)
    if settings is not None:
        queued, said = maintenance.resend_through_api(settings, args.sha256, scope=scope)
        print(said)
        return EXIT_OK if queued else EXIT_UNAVAILABLE
    queued = maintenance.resend(url, args.sha256, scope=scope)
    print(
        "queued for a deliberate resend"
        if queued
        else "no forwarded document with "
        "that SHA-256 whose bytes are kept (INVOICE_RELAY_KEEP_PDFS)"
    )
    return EXIT_OK if queued else EXIT_UNAVAILABLE


def _resend_settings(
    environ: Mapping[str, str],
    deployment: Deployment | None,
    url: str,
    sha256: str,
    scope: DocumentScope,
) -> Settings | None:
    """The settings of the API route a resend goes through; None: by mail (no API call)."""
    if deployment is not None:
        from worker.cli import maintenance

        # The route that delivers the document: the one polling the folder whose mail
        # introduced it. Only its own API account can say whether it holds the PDF.
        folders = maintenance.document_mailboxes(url, sha256, scope=scope)
        owners = [route for route in deployment.routes if route.mailbox in folders]
        if len(owners) != 1:
            return None  # no such document, or by mail: the store answers below
        owner = owners[0]
        return owner.settings if owner.settings.delivery is DeliveryKind.GETMYINVOICES else None
    if environ.get("INVOICE_RELAY_DELIVERY", "").strip().lower() == "getmyinvoices":
        return load_logged(environ).process
    return None
