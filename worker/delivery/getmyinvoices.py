"""Delivering to GetMyInvoices through its REST API (v3); the only module that calls it.

`GmiDestination` is the adapter behind `worker.relay.ports.Destination`. Each answer is
classified once (`worker.delivery.gmiapi.classify`), as shared/DESIGN.md "Delivering
through the GetMyInvoices API" lays down: 200 is a receipt with the `documentUid`; 422/127 (or
`/documents/exists` true) is delivered already; 422/105, 403/429, HTTP 429 and 503 are a
limit (`DeliveryThrottled`: pending, not an attempt); 422/100 a deferral with backoff;
403 with 403, 407, 430 or 431 a refused session (`DestinationRefused`); any other 4xx a
rejection. Every httpx failure becomes one of those too.

A document is marked upload-started (`UploadMarks`) before its upload goes out; an
attempt at a document so marked first asks `/documents/exists`, so that an upload whose
answer was lost is not repeated. Every call is spent from the destination's budget
(`CallBudget`, kept in the database) before it is made, except `GET /account`: its
answer names the destination, so it is counted (as a call, not an upload) after it.

The API key travels in `X-API-KEY` only: it is never logged and never in an error.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from worker.delivery.gmiapi import (
    ALREADY_THERE,
    APPLICATION,
    VIA,
    Account,
    as_integer,
    classify,
    document_type,
    header_seconds,
    upload_request,
)
from worker.errors import (
    DeliveryDeferred,
    DeliveryRefused,
    DeliveryThrottled,
    DeliveryUnavailable,
    DeliveryUncertain,
)
from worker.faults import Checkpoint, CrashPoint, no_checkpoint
from worker.mail.text import clean_text
from worker.models import (
    DEFAULT_GMI_API_URL,
    DEFAULT_GMI_DOCUMENT_TYPE,
    DEFAULT_TIMEOUT_SECONDS,
    Parcel,
    Receipt,
    SecretText,
)

__all__ = ["BudgetHold", "CallBudget", "GmiDestination", "UploadMarks"]

logger = logging.getLogger(__name__)


class BudgetHold(Protocol):
    """A limit that allows no call before `until` (`worker.relay.budget.Hold`)."""

    @property
    def limit(self) -> str: ...

    @property
    def until(self) -> datetime: ...

    @property
    def seconds(self) -> float:
        """How long until `until`, on the budget's clock (the database's)."""
        ...


class CallBudget(Protocol):
    """The destination's budgets, shared through the database (`worker.relay.budget`)."""

    def spend(self, destination: str, *, upload: bool) -> BudgetHold | None:
        """Spend one call (and one upload); the hold instead when a limit is reached."""

    def count(self, destination: str) -> None:
        """A call already made (`GET /account`): counted as a call, not as an upload."""

    def hold(self, destination: str, *, seconds: float, limit: str) -> datetime:
        """The API reported `limit`: every sharer waits `seconds`."""


class UploadMarks(Protocol):
    """Where the upload-started mark is written (`documents.upload_started_at`)."""

    def mark_upload_started(
        self, sha256: str, *, now: datetime, destination: str | None = None
    ) -> None:
        """`destination` is the parcel's: the mark is that destination's document's."""


class GmiDestination:
    """One session with a GetMyInvoices account: one HTTP client, reused."""

    def __init__(
        self,
        *,
        api_key: SecretText,
        budget: CallBudget,
        marks: UploadMarks,
        api_url: str = DEFAULT_GMI_API_URL,
        document_type: str = DEFAULT_GMI_DOCUMENT_TYPE,
        credit_note_pattern: re.Pattern[str] | None = None,
        run_ocr: bool = True,
        tags: Sequence[str] = (),
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        checkpoint: Checkpoint = no_checkpoint,
        transport: httpx.BaseTransport | None = None,  # tests: httpx.MockTransport
    ) -> None:
        self._api_key = api_key
        self._budget = budget
        self._marks = marks
        self._base = api_url.rstrip("/")
        self._document_type = document_type
        self._credit_notes = credit_note_pattern
        self._run_ocr = run_ocr
        self._tags = tuple(tags)
        self._ca_file = ca_file
        self._timeout = timeout
        self._clock = clock
        self._checkpoint = checkpoint
        self._transport = transport
        self._client: httpx.Client | None = None
        self._account: Account | None = None

    def __repr__(self) -> str:
        return f"GmiDestination(api_url={self._base!r}, api_key='****')"

    # --- the session -------------------------------------------------------------------

    def open(self) -> None:
        """Connect and read the account (the budgets' key). Raises `DeliveryUnavailable`."""
        if self._account is None:
            try:
                account = self.account()
                # A call like any other to the minute and day limits (none is exempted).
                self._budget.count(account.destination)
            except BaseException:  # refused, or the budget's store failed
                self.close()  # the caller closes only a session that opened
                raise
            self._account = account

    def account(self) -> Account:
        """`GET /account` (what `check` asks): the account's id and name."""
        body = self._call("GET", "/account")
        account_id = str(body.get("accountId") or "").strip()  # an "integer" like G-20707-0
        if not account_id:
            raise DeliveryUnavailable("GetMyInvoices: GET /account named no accountId")
        return Account(account_id=account_id, name=clean_text(str(body.get("name") or ""), 200))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- one document ------------------------------------------------------------------

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        """Upload one document. `before_final` runs right before the upload request goes
        out: nothing of it can be accepted before then. `more_follows` is ignored: each
        upload is one request, with nothing to send ahead."""
        del more_follows
        self.open()
        encoded = base64.b64encode(parcel.content).decode("ascii")
        if parcel.upload_started and self.exists_encoded(encoded, sha256=parcel.sha256):
            return Receipt(delivery_id="", answer=ALREADY_THERE, via=VIA)
        request = self.upload_request(parcel, encoded)
        if parcel.invoice_number and parcel.invoice_number_ambiguous:
            logger.info(
                "uploading %s without documentNumber: its first pages name several"
                " invoice numbers (the first is %s)",
                parcel.filename,
                parcel.invoice_number,
                extra={"action": "gmi_number_ambiguous", "sha256": parcel.sha256},
            )
        self._spend(upload=True, sha256=parcel.sha256)
        self._marks.mark_upload_started(
            parcel.sha256, now=self._clock(), destination=parcel.destination
        )
        self._checkpoint(CrashPoint.AFTER_UPLOAD_STARTED)
        if before_final is not None:
            before_final()
        status, body = self._send("POST", "/documents", request, sha256=parcel.sha256, sent=True)
        if status == 422 and as_integer(body.get("error_code")) == 127:
            return Receipt(delivery_id="", answer=ALREADY_THERE, via=VIA)
        self._raise_for(status, body, sha256=parcel.sha256)
        uid = body.get("documentUid")
        if body.get("success") is not True or as_integer(uid) is None:
            raise DeliveryUncertain(
                f"GetMyInvoices answered 200 without a documentUid: {clean_text(str(body), 200)}",
                code=status,
                sha256=parcel.sha256,
            )
        return Receipt(delivery_id=str(uid), answer=f"200 documentUid {uid}", via=VIA)

    def exists(self, content: bytes) -> bool:
        """`POST /documents/exists`: whether the account holds this file (for `resend`)."""
        self.open()
        return self.exists_encoded(base64.b64encode(content).decode("ascii"), sha256="")

    def exists_encoded(self, encoded: str, *, sha256: str) -> bool:
        self._spend(upload=False, sha256=sha256)
        status, body = self._send(
            "POST", "/documents/exists", {"fileContent": encoded}, sha256=sha256, sent=False
        )
        self._raise_for(status, body, sha256=sha256)
        return body.get("exists") is True

    def upload_request(self, parcel: Parcel, encoded: str) -> dict[str, Any]:
        """The body of `POST /documents` for this parcel."""
        return upload_request(
            parcel,
            encoded,
            document_type=self.document_type(parcel),
            run_ocr=self._run_ocr,
            tags=self._tags,
        )

    def document_type(self, parcel: Parcel) -> str:
        """CREDIT_NOTE where the pattern matched the first pages' text, the filename or
        the subject; else INVOICE_RELAY_GMI_DOCUMENT_TYPE."""
        return document_type(parcel, pattern=self._credit_notes, default=self._document_type)

    # --- HTTP ----------------------------------------------------------------------------

    def _spend(self, *, upload: bool, sha256: str) -> None:
        destination = self._destination()
        hold = self._budget.spend(destination, upload=upload)
        if hold is not None:
            # Measured on the budget's clock: this host's may disagree with it.
            wait = max(1.0, hold.seconds)
            raise DeliveryThrottled(
                "counted by the relay", retry_after_seconds=wait, limit=hold.limit, sha256=sha256
            )

    @property
    def destination_name(self) -> str:
        """`getmyinvoices:<accountId>` once open: a route's destination by default."""
        return self._destination()

    def _destination(self) -> str:
        if self._account is None:
            raise DeliveryUnavailable("GetMyInvoices: the session is not open")
        return self._account.destination

    def _raise_for(self, status: int, body: Mapping[str, Any], *, sha256: str) -> None:
        hinted = body.get("retry_after")
        refusal = classify(
            status, body, retry_after=float(hinted) if isinstance(hinted, int | float) else None
        )
        if refusal is None:
            return
        if isinstance(refusal, DeliveryThrottled) and self._account is not None:
            # Every sharer of the account waits too, not only this document.
            self._budget.hold(
                self._account.destination,
                seconds=refusal.retry_after_seconds,
                limit=refusal.limit,
            )
        if isinstance(refusal, DeliveryRefused):
            refusal.sha256 = sha256
        raise refusal

    def _call(self, method: str, path: str) -> dict[str, Any]:
        """A call outside any document (the account): every refusal ends the session."""
        status, body = self._send(method, path, None, sha256="", sent=False)
        refusal = classify(status, body)
        if isinstance(refusal, DeliveryUnavailable):
            raise refusal
        if refusal is not None:
            raise DeliveryUnavailable(f"GetMyInvoices {method} {path}: {refusal.detail}")
        return body

    def _send(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        *,
        sha256: str,
        sent: bool,
    ) -> tuple[int, dict[str, Any]]:
        """One request; (status, JSON body). `sent`: an answer lost after the request
        went out may mean the document arrived (`DeliveryUncertain`)."""
        client = self._session()
        try:
            response = client.request(method, self._base + path, json=payload)
        except httpx.ConnectError as exc:
            raise DeliveryUnavailable(f"GetMyInvoices {self._base}: {_reason(exc)}") from exc
        except httpx.HTTPError as exc:
            if sent:
                raise DeliveryUncertain(
                    f"GetMyInvoices: the answer was lost ({_reason(exc)})", sha256=sha256
                ) from exc
            raise DeliveryDeferred(
                f"GetMyInvoices {method} {path}: {_reason(exc)}", sha256=sha256
            ) from exc
        retry_after = header_seconds(response.headers.get("retry-after"))
        try:
            parsed = response.json() if response.content else {}
        except ValueError:
            parsed = {}
        body = parsed if isinstance(parsed, dict) else {}
        if response.status_code in (429, 503) and retry_after is not None:
            body.setdefault("retry_after", retry_after)
        return response.status_code, body

    def _session(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                headers={
                    "X-API-KEY": self._api_key.reveal(),
                    "x-application": APPLICATION,
                    "Accept": "application/json",
                },
                timeout=httpx.Timeout(self._timeout),
                verify=self._tls_context(),
                transport=self._transport,
                # trust_env (the default): HTTPS_PROXY, HTTP_PROXY, NO_PROXY are honoured.
            )
        return self._client

    def _tls_context(self) -> ssl.SSLContext:
        """The system's CAs, and INVOICE_RELAY_CA_FILE in addition."""
        context = ssl.create_default_context()
        if self._ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self._ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise DeliveryUnavailable(f"INVOICE_RELAY_CA_FILE: {exc}") from exc
        return context


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return clean_text(text, 300)
