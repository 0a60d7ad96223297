"""A fake GetMyInvoices API (v3) on a free loopback port, speaking real HTTP.

It validates every request against `tests.servers.gmi_schema` (fields, types, document
types, base64 that decodes to a PDF, JSON content type, the key), answers as the
published description says (200 `{"success": true, "documentUid": N}`, 422 with
`error_code`, 403 with `code`, 503), and keeps a log of every call. `faults` scripts the
next answers of `POST /documents` (and `exists` with `exists_faults`); `drop_after_store`
stores an upload and closes the connection without answering; `detect_duplicates`
False makes it file the same bytes twice, as a real account may.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import jsonschema

from tests.servers import gmi_schema

ACCOUNT_ID = "G-20707-0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    problem: str | None  # why the request broke the schema; None when it did not


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """A scripted answer: `status` with `body`; `drop` stores nothing, answers nothing."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def unprocessable(code: int, detail: str = "Request could not be processed.") -> Answer:
    return Answer(status=422, body={"success": False, "detail": detail, "error_code": code})


def refused(code: int) -> Answer:
    return Answer(status=403, body={"code": code, "detail": "Invalid API key."})


UNAVAILABLE = Answer(
    status=503, body={"code": 503, "detail": "Temporary Issue. Please retry in a few minutes."}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    uid: int
    sha256: str
    request: dict[str, Any]


class FakeGetMyInvoices:
    def __init__(self, *, api_key: str = "test-key-123") -> None:
        self.api_key = api_key
        self.calls: list[Call] = []
        self.documents: list[Stored] = []
        self.faults: list[Answer] = []
        self.exists_faults: list[Answer] = []
        self.account_faults: list[Answer] = []
        self.drop_after_store = 0  # uploads to store and then drop the connection of
        self.detect_duplicates = True
        self._lock = threading.Lock()
        self._next_uid = 28716
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/accounts/v3"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def problems(self) -> list[str]:
        return [f"{c.method} {c.path}: {c.problem}" for c in self.calls if c.problem]

    def uploads(self) -> list[Call]:
        return [c for c in self.calls if c.method == "POST" and c.path.endswith("/documents")]

    def copies(self, sha256: str) -> int:
        return sum(1 for d in self.documents if d.sha256 == sha256)

    # --- answering -------------------------------------------------------------------

    def answer(self, call: Call) -> Answer | None:
        """None: drop the connection without a word."""
        with self._lock:
            if call.problem is not None:
                if call.problem.startswith("key"):
                    return refused(403)
                if call.problem.startswith("content type"):
                    return Answer(
                        status=415,
                        body={"code": 415, "detail": "Request content-type is not valid."},
                    )
                return unprocessable(102, call.problem)
            path = call.path.removeprefix("/accounts/v3")
            if path == "/account" and call.method == "GET":
                if self.account_faults:
                    return self.account_faults.pop(0)
                return Answer(status=200, body={"name": "Dev Test", "accountId": ACCOUNT_ID})
            body = call.body or {}
            content = base64.b64decode(body.get("fileContent", ""))
            sha256 = hashlib.sha256(content).hexdigest()
            if path == "/documents/exists" and call.method == "POST":
                if self.exists_faults:
                    return self.exists_faults.pop(0)
                return Answer(status=200, body={"success": True, "exists": self.copies(sha256) > 0})
            if path == "/documents" and call.method == "POST":
                if self.faults:
                    return self.faults.pop(0)
                if self.detect_duplicates and self.copies(sha256):
                    return unprocessable(127, "Document already exists in account.")
                uid = self._next_uid
                self._next_uid += 1
                self.documents.append(Stored(uid=uid, sha256=sha256, request=body))
                if self.drop_after_store > 0:
                    self.drop_after_store -= 1
                    return None
                return Answer(status=200, body={"success": True, "documentUid": uid})
            return Answer(status=405, body={})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the calls are in `fake.calls`."""

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                call = fake.received(self.command, self.path, dict(self.headers.items()), raw)
                fake.calls.append(call)
                answer = fake.answer(call)
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                payload = json.dumps(answer.body).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve
            do_POST = _serve

        return Handler

    def received(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Call:
        lowered = {name.lower(): value for name, value in headers.items()}
        return Call(
            method=method,
            path=path,
            headers=lowered,
            body=_json(raw),
            problem=request_problem(method, path, lowered, raw, api_key=self.api_key),
        )


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def request_problem(
    method: str, path: str, headers: dict[str, str], raw: bytes, *, api_key: str
) -> str | None:
    """Why a request breaks the API's rules (`gmi_schema`); None when it does not."""
    for name in gmi_schema.REQUIRED_HEADERS:
        if name not in headers:
            return f"header {name} missing" if name != "x-api-key" else "key missing"
    if headers["x-api-key"] != api_key:
        return "key unknown"
    if headers["x-application"] != "invoice-relay":
        return "header x-application is not invoice-relay"
    if method == "GET":
        return None
    if not headers.get("content-type", "").startswith("application/json"):
        return "content type is not application/json"
    body = _json(raw)
    if body is None:
        return "the body is not a JSON object"
    schema = gmi_schema.EXISTS if path.endswith("/documents/exists") else gmi_schema.UPLOAD
    try:
        jsonschema.validate(body, schema)
    except jsonschema.ValidationError as exc:
        return f"schema: {exc.message}"
    try:
        content = base64.b64decode(body["fileContent"], validate=True)
    except (binascii.Error, ValueError):
        return "fileContent is not base64"
    if not content.startswith(b"%PDF-"):
        return "fileContent is not a PDF"
    return None
