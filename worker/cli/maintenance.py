"""The one-shot commands beside polling: audit, db upgrade, retry, resend, oauth, and
the container's healthcheck."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime

from worker.cli.wiring import gmi_destination, prepared_store
from worker.config.settings import Settings, http_port_from_env
from worker.delivery.gmiapi import ALREADY_THERE
from worker.errors import StoreError
from worker.models import AuditFilter, AuditRow, DocumentScope, PurgeCounts, sqlite_file
from worker.store import migrate
from worker.store.sqlstore import SqlStore

_EVERYWHERE = DocumentScope()


def _existing_database(url: str) -> SqlStore:
    """Read-only and maintenance commands never create a database by accident."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StoreError(f"no database at {path} yet (run `invoice-relay once` first)")
    if migrate.current_revision(url) is None:
        raise StoreError(
            "the database holds no relay tables yet (run `invoice-relay db upgrade` or a poll)"
        )
    return SqlStore(url)


def audit_rows(url: str, query: AuditFilter) -> list[AuditRow]:
    store = _existing_database(url)
    try:
        return store.audit(query)
    finally:
        store.close()


def oauth_status(settings: Settings) -> list[str]:
    from worker.cli.oauth import status_lines  # MSAL and google-auth only when asked

    store = _existing_database(settings.database_url.reveal())
    try:
        return status_lines(settings, store)
    finally:
        store.close()


def oauth_login(
    settings: Settings, *, show: Callable[[str], None], pasted: Callable[[], str]
) -> str:
    from worker.cli.oauth import login

    store = prepared_store(settings)  # the refresh token is stored: migrate like a poll
    try:
        return login(settings, store, show=show, pasted=pasted)
    finally:
        store.close()


def upgrade(url: str) -> None:
    migrate.upgrade_database(url)


def retry(url: str, sha256: str | None, *, scope: DocumentScope = _EVERYWHERE) -> int:
    store = _existing_database(url)
    try:
        return store.requeue(
            sha256=sha256, now=datetime.now(UTC), route=scope.route, destination=scope.destination
        )
    finally:
        store.close()


def resend(url: str, sha256: str, *, scope: DocumentScope = _EVERYWHERE) -> bool:
    store = _existing_database(url)
    try:
        return store.resend(
            sha256=sha256, now=datetime.now(UTC), route=scope.route, destination=scope.destination
        )
    finally:
        store.close()


def purge(
    url: str, route: str, *, before: datetime | None, keep: Collection[str] = ()
) -> list[tuple[str, PurgeCounts | None]]:
    """Delete a removed route's sightings and the documents its mail introduced, folder
    by folder (each in one transaction), except the folders in `keep` (polled by a
    configured route: None for those). Empty when the route recorded nothing."""
    store = _existing_database(url)
    try:
        return [
            (mailbox, None if mailbox in keep else store.purge(mailbox, before=before))
            for mailbox in store.route_mailboxes(route)
        ]
    finally:
        store.close()


def document_mailboxes(url: str, sha256: str, *, scope: DocumentScope) -> list[str]:
    """The folders whose mail introduced the documents with this SHA-256 (in `scope`)."""
    store = _existing_database(url)
    try:
        return store.document_mailboxes(sha256, route=scope.route, destination=scope.destination)
    finally:
        store.close()


def resend_through_api(
    settings: Settings, sha256: str, *, scope: DocumentScope = _EVERYWHERE
) -> tuple[bool, str]:
    """`resend` with INVOICE_RELAY_DELIVERY=getmyinvoices: queued only when the API says
    it does not hold the document (a second copy would be filed otherwise)."""
    store = _existing_database(settings.database_url.reveal())
    try:
        content = store.kept_content(sha256, route=scope.route, destination=scope.destination)
        if content is None:
            return False, (
                "no document with that SHA-256 whose bytes are kept (INVOICE_RELAY_KEEP_PDFS)"
            )
        api = gmi_destination(settings, store)
        try:
            there = api.exists(content)
        finally:
            api.close()
        if there:
            return False, f"not queued: {ALREADY_THERE}"
        queued = store.resend(
            sha256=sha256, now=datetime.now(UTC), route=scope.route, destination=scope.destination
        )
        return queued, "queued for a deliberate resend" if queued else "not a forwarded document"
    finally:
        store.close()


def healthcheck(environ: Mapping[str, str], *, ready: bool) -> int:
    from worker.service.health import probe_health

    port = http_port_from_env(environ)
    if port == 0:
        print("the HTTP server is off (INVOICE_RELAY_HTTP_PORT=0): nothing to ask")
        return 1
    healthy, detail = probe_health(port, ready=ready)
    print(detail)
    return 0 if healthy else 1
