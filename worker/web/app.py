"""The status page as a Starlette app: sign-in, overview, audit log, a document's story,
CSV, and the actions retry, resend and PDF download (shared/DESIGN.md, "The status page").

Why Starlette (with Jinja2 and uvicorn) and not one more `BaseHTTPRequestHandler`: the
page needs signed sessions, form parsing, routing with typed path parameters, templates
that escape by default and a server that copes with slow or many clients; Starlette
brings each of these as a small, typed part (no ORM, no global app object), runs behind
uvicorn in a thread of `run`, and has a TestClient for the views' unit tests.

Every read goes through `PageReader` with the signed-in user's `RouteScope`, so a row
outside it is a 404 like a row that does not exist; every change goes through the same
`AdminStore` operations as the CLI's `retry` and `resend`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker.config.web import WebSettings
from worker.mail.csvsafe import write_csv
from worker.mail.text import clean_text
from worker.models import KEPT_ATTEMPTS, AuditRow, Outcome, PollStatus
from worker.relay.ports import AdminStore, PageReader, WebSessionStore
from worker.web import search as audit_search
from worker.web.auth import Account, LoginThrottle, PasswordBook, client_address, new_token
from worker.web.auth import token_hash as hash_token
from worker.web.rendering import content_disposition, session_key, templates
from worker.web.security import SecurityHeaders, origin_allowed

log = logging.getLogger(__name__)

COOKIE = "invoice_relay_session"
_CSV_COLUMNS = tuple(name for name in AuditRow.__dataclass_fields__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Visitor:
    """The signed-in user of one request."""

    account: Account
    csrf_token: str
    token_hash: str


class StatusPage:
    """The views; `app` is the ASGI application. The stores are Protocols (fakes in
    tests, `SqlStore` in `run`); `poll_status` asks the running service."""

    def __init__(
        self,
        *,
        settings: WebSettings,
        reader: PageReader,
        admin: AdminStore,
        sessions: WebSessionStore,
        poll_status: Callable[[], PollStatus] = PollStatus,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        throttle: LoginThrottle | None = None,
        passwords: PasswordBook | None = None,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._admin = admin
        self._sessions = sessions
        self._poll_status = poll_status
        self._clock = clock
        self._monotonic = monotonic
        self._throttle = throttle if throttle is not None else LoginThrottle()
        self._passwords = passwords if passwords is not None else PasswordBook(settings.users)
        self._templates = templates()
        static = StaticFiles(directory=str(files("worker.web") / "static"))
        self.app = Starlette(
            routes=[
                Route("/", self.overview),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/audit", self.audit),
                Route("/audit.csv", self.audit_csv),
                Route("/documents/{sighting_id:int}", self.document),
                Route("/documents/{sighting_id:int}/retry", self.retry, methods=["POST"]),
                Route("/documents/{sighting_id:int}/resend", self.resend, methods=["POST"]),
                Route("/documents/{sighting_id:int}/pdf", self.pdf),
                Mount("/static", app=static, name="static"),
            ],
            middleware=[
                Middleware(SecurityHeaders, https=settings.https),
                Middleware(
                    SessionMiddleware,
                    secret_key=session_key(settings.secret_key),
                    session_cookie=COOKIE,
                    max_age=None,  # a browser session; the database ends it when idle
                    same_site="strict",
                    https_only=settings.https,
                ),
            ],
            exception_handlers={HTTPException: self._error},
        )

    # --- plumbing ------------------------------------------------------------------------

    def _render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        template = self._templates.get_template(name)
        html = template.render(request=request, keep_pdfs=self._settings.keep_pdfs, **context)
        return HTMLResponse(html, status_code=status)

    async def _error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self._render(
            request,
            "error.html",
            status=exc.status_code,
            status_code=exc.status_code,
            detail=exc.detail,
            visitor=None,
        )

    def _address(self, request: Request) -> str:
        peer = request.client.host if request.client is not None else None
        return client_address(peer, request.headers, self._settings.trusted_proxies)

    async def _visitor(self, request: Request) -> Visitor | None:
        token = request.session.get("token")
        if not isinstance(token, str):
            return None
        hashed = hash_token(token)
        session = await run_in_threadpool(
            lambda: self._sessions.live_session(
                token_hash=hashed, now=self._clock(), idle_seconds=self._settings.idle_seconds
            )
        )
        account = None if session is None else self._passwords.account(session.user)
        if session is None or account is None:
            request.session.clear()
            return None
        return Visitor(account=account, csrf_token=session.csrf_token, token_hash=hashed)

    async def _page_visitor(self, request: Request) -> Visitor | Response:
        visitor = await self._visitor(request)
        if visitor is None:
            return RedirectResponse("/login", status_code=303)
        return visitor

    async def _posting_visitor(self, request: Request) -> Visitor:
        """The visitor of a POST: the Origin matches and the form's CSRF token is the
        session's, else 403."""
        if not origin_allowed(
            request.headers, self._settings.public_origin if self._settings.https else None
        ):
            raise HTTPException(403, "This request did not come from the status page.")
        visitor = await self._visitor(request)
        if visitor is None:
            raise HTTPException(403, "Not signed in (or the session ended).")
        form = await request.form()
        sent = form.get("csrf")
        if not isinstance(sent, str) or not hmac.compare_digest(sent, visitor.csrf_token):
            raise HTTPException(403, "The form was stale or forged; reload the page.")
        return visitor

    # --- signing in and out --------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request)

    def _login_page(
        self, request: Request, *, problem: str | None = None, status: int = 200
    ) -> Response:
        login_csrf = new_token()
        request.session["login_csrf"] = login_csrf
        return self._render(
            request,
            "login.html",
            status=status,
            login_csrf=login_csrf,
            problem=problem,
            visitor=None,
        )

    async def login(self, request: Request) -> Response:
        if not origin_allowed(
            request.headers, self._settings.public_origin if self._settings.https else None
        ):
            raise HTTPException(403, "This request did not come from the status page.")
        form = await request.form()
        expected = request.session.get("login_csrf")
        sent = form.get("csrf")
        if not (
            isinstance(expected, str)
            and isinstance(sent, str)
            and hmac.compare_digest(sent, expected)
        ):
            raise HTTPException(403, "The form was stale or forged; reload the page.")
        address = self._address(request)
        wait = self._throttle.wait_seconds(address, self._monotonic())
        if wait > 0:
            log.warning(
                "login refused: too many failures from %s",
                address,
                extra={"action": "web_login_throttled"},
            )
            return self._login_page(
                request, problem=f"Too many failed sign-ins; try again in {wait:.0f} s.", status=429
            )
        name = str(form.get("user", ""))[:64]
        password = str(form.get("password", ""))
        account = await run_in_threadpool(self._passwords.check, name, password)
        if account is None:
            self._throttle.failed(address, self._monotonic())
            # Never the password; the name is capped and cleaned (a stranger typed it).
            log.warning(
                "login failed for %r from %s",
                clean_text(name, 64),
                address,
                extra={"action": "web_login_failed"},
            )
            return self._login_page(request, problem="Wrong user name or password.", status=401)
        self._throttle.succeeded(address)
        token, csrf = new_token(), new_token()
        await run_in_threadpool(
            lambda: self._sessions.start_session(
                token_hash=hash_token(token), user=account.name, csrf_token=csrf, now=self._clock()
            )
        )
        request.session.clear()
        request.session["token"] = token
        log.info("%s signed in from %s", account.name, address, extra={"action": "web_login"})
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Request) -> Response:
        visitor = await self._posting_visitor(request)
        await run_in_threadpool(lambda: self._sessions.end_session(token_hash=visitor.token_hash))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        visitor = await self._page_visitor(request)
        if isinstance(visitor, Response):
            return visitor
        now = self._clock()
        routes = await run_in_threadpool(self._reader.route_overviews, visitor.account.scope, now)
        return self._render(
            request,
            "overview.html",
            visitor=visitor,
            routes=routes,
            poll=self._poll_status(),
            outcomes=list(Outcome),
            now=now,
        )

    async def audit(self, request: Request) -> Response:
        visitor = await self._page_visitor(request)
        if isinstance(visitor, Response):
            return visitor
        params = dict(request.query_params)
        wanted = audit_search.search_from_query(params, visitor.account.scope)
        page = await run_in_threadpool(self._reader.search_audit, wanted)
        rows_per_page = wanted.limit or 1
        current = wanted.offset // rows_per_page + 1
        return self._render(
            request,
            "audit.html",
            visitor=visitor,
            params=params,
            page=page,
            current=current,
            pages=audit_search.page_numbers(page.total, rows_per_page, current),
            link=lambda **changes: audit_search.query_string(params, **changes),
            outcomes=list(Outcome),
        )

    async def audit_csv(self, request: Request) -> Response:
        visitor = await self._page_visitor(request)
        if isinstance(visitor, Response):
            return visitor
        wanted = audit_search.search_from_query(
            dict(request.query_params), visitor.account.scope, page_rows=None
        )
        page = await run_in_threadpool(self._reader.search_audit, wanted)
        body = write_csv(
            _CSV_COLUMNS, ([getattr(row, name) for name in _CSV_COLUMNS] for row in page.rows)
        )
        return Response(
            body,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
        )

    async def document(self, request: Request) -> Response:
        visitor = await self._page_visitor(request)
        if isinstance(visitor, Response):
            return visitor
        sighting_id = int(request.path_params["sighting_id"])
        story = await run_in_threadpool(
            self._reader.document_story, sighting_id, visitor.account.scope
        )
        if story is None:
            raise HTTPException(404, "No such document.")
        return self._render(
            request, "document.html", visitor=visitor, story=story, kept_attempts=KEPT_ATTEMPTS
        )

    # --- actions -------------------------------------------------------------------------

    async def retry(self, request: Request) -> Response:
        return await self._act(request, "retry")

    async def resend(self, request: Request) -> Response:
        if not self._settings.keep_pdfs:
            raise HTTPException(404, "Resending needs INVOICE_RELAY_KEEP_PDFS.")
        return await self._act(request, "resend")

    async def _act(self, request: Request, action: str) -> Response:
        visitor = await self._posting_visitor(request)
        sighting_id = int(request.path_params["sighting_id"])
        story = await run_in_threadpool(
            self._reader.document_story, sighting_id, visitor.account.scope
        )
        if story is None:
            raise HTTPException(404, "No such document.")
        sha256 = story.row.sha256
        if story.document_id is None or sha256 is None:
            raise HTTPException(409, "This row has no document to act on.")
        now = self._clock()
        # The row's own destination: the same PDF may be bound for others too.
        bound_for = story.row.destination
        if action == "retry":
            changed = await run_in_threadpool(
                lambda: self._admin.requeue(sha256=sha256, now=now, destination=bound_for) > 0
            )
        else:
            changed = await run_in_threadpool(
                lambda: self._admin.resend(sha256=sha256, now=now, destination=bound_for)
            )
        log.info(
            "%s asked to %s document %s: %s",
            visitor.account.name,
            action,
            story.document_id,
            "queued" if changed else "nothing to do",
            extra={"action": f"web_{action}", "sha256": sha256},
        )
        if not changed:
            raise HTTPException(
                409, f"Nothing to {action}: the document is {story.state and story.state.value}."
            )
        return RedirectResponse(f"/documents/{sighting_id}", status_code=303)

    async def pdf(self, request: Request) -> Response:
        visitor = await self._page_visitor(request)
        if isinstance(visitor, Response):
            return visitor
        if not self._settings.keep_pdfs:
            raise HTTPException(404, "Downloads need INVOICE_RELAY_KEEP_PDFS.")
        sighting_id = int(request.path_params["sighting_id"])
        found = await run_in_threadpool(
            self._reader.document_pdf, sighting_id, visitor.account.scope
        )
        if found is None:
            raise HTTPException(404, "No kept PDF for this document.")
        filename, content = found
        return Response(
            content,
            media_type="application/pdf",
            headers={"Content-Disposition": content_disposition(filename)},
        )
