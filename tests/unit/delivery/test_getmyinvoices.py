"""The GetMyInvoices answer classes (shared/DESIGN.md, "Delivering through the
GetMyInvoices API"), the budgets' decision, and the adapter's requests against the
schema the fake server validates with."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.servers.getmyinvoices import ACCOUNT_ID, request_problem
from worker.config.environment import Secret
from worker.delivery.getmyinvoices import GmiDestination
from worker.delivery.gmiapi import ALREADY_THERE, AMBIGUOUS_NUMBER, classify
from worker.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryThrottled,
    DeliveryUncertain,
    DestinationRefused,
)
from worker.models import DEFAULT_GMI_CREDIT_NOTE_PATTERN, Parcel
from worker.relay.budget import Budget, Hold, Window, decide, window_starts

NOW = datetime(2026, 12, 1, 10, 30, 15, tzinfo=UTC)
KEY = "secret-key-4711"


@pytest.mark.parametrize(
    ("status", "body", "expected", "words"),
    [
        (200, {"success": True, "documentUid": 1}, None, ""),
        (422, {"error_code": 127}, None, ""),
        (422, {"error_code": 105}, DeliveryThrottled, "hourly upload limit"),
        (403, {"code": 429}, DeliveryThrottled, "minute or day"),
        (429, {}, DeliveryThrottled, "HTTP 429"),
        (503, {"code": 503}, DeliveryThrottled, "HTTP 503"),
        (422, {"error_code": 100}, DeliveryDeferred, "unexpected"),
        (403, {"code": 403}, DestinationRefused, "the API key is unknown"),
        (403, {"code": 407}, DestinationRefused, "blocked"),
        (403, {"code": 430}, DestinationRefused, "lacks permission"),
        (403, {"code": 431}, DestinationRefused, "cancelled"),
        (422, {"error_code": 101, "detail": "File type not supported."}, DeliveryRejected, "101"),
        (400, {}, DeliveryRejected, "no error_code"),
        (415, {"code": 415}, DeliveryRejected, "415"),
        (500, {}, DeliveryDeferred, "HTTP 500"),
    ],
)
def test_each_answer_has_its_class(
    status: int, body: dict[str, Any], expected: type[Exception] | None, words: str
) -> None:
    refusal = classify(status, body)
    if expected is None:
        assert refusal is None
        return
    assert type(refusal) is expected
    assert words in str(refusal)


def test_a_limit_is_not_a_failure_of_the_document() -> None:
    throttled = classify(403, {"code": 429})
    assert isinstance(throttled, DeliveryThrottled)
    assert not throttled.permanent
    assert throttled.retry_after_seconds > 0


def test_retry_after_is_obeyed() -> None:
    throttled = classify(429, {}, retry_after=120.0)
    assert isinstance(throttled, DeliveryThrottled)
    assert throttled.retry_after_seconds == 120.0


@pytest.mark.parametrize(
    ("used", "upload", "held_until", "limit", "until"),
    [
        ({}, True, None, None, None),
        ({Window.MINUTE: 59}, False, None, None, None),
        ({Window.MINUTE: 60}, False, None, "calls-per-minute", NOW.replace(minute=31, second=0)),
        ({Window.DAY: 2500}, False, None, "calls-per-day", datetime(2026, 12, 2, tzinfo=UTC)),
        (
            {Window.UPLOAD_HOUR: 100},
            True,
            None,
            "hourly upload",
            NOW.replace(hour=11, minute=0, second=0),
        ),
        ({Window.UPLOAD_HOUR: 100}, False, None, None, None),
        ({}, False, NOW + timedelta(seconds=5), "asked", NOW + timedelta(seconds=5)),
        ({}, False, NOW - timedelta(seconds=5), None, None),
    ],
)
def test_the_budget_decides(
    used: dict[Window, int],
    upload: bool,
    held_until: datetime | None,
    limit: str | None,
    until: datetime | None,
) -> None:
    starts = window_starts(NOW, upload=upload)
    hold = decide(
        Budget(), now=NOW, used=used, starts=starts, held_until=held_until, held_for="asked"
    )
    if limit is None:
        assert hold is None
        return
    assert isinstance(hold, Hold)
    assert limit in hold.limit
    assert hold.until == until


class _Budget:
    def __init__(self) -> None:
        self.spent: list[bool] = []
        self.counted: list[str] = []
        self.holds: list[str] = []
        self.refuse: Hold | None = None

    def spend(self, destination: str, *, upload: bool) -> Hold | None:
        assert destination == f"getmyinvoices:{ACCOUNT_ID}"
        if self.refuse is not None:
            return self.refuse
        self.spent.append(upload)
        return None

    def count(self, destination: str) -> None:
        self.counted.append(destination)

    def hold(self, destination: str, *, seconds: float, limit: str) -> datetime:
        self.holds.append(limit)
        return NOW + timedelta(seconds=seconds)


class _Marks:
    def __init__(self) -> None:
        self.started: list[str] = []

    def mark_upload_started(
        self, sha256: str, *, now: datetime, destination: str | None = None
    ) -> None:
        self.started.append(sha256)


class _Api:
    """An httpx transport that checks each request against the schema."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.requests: list[httpx.Request] = []
        self.answers = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        problem = request_problem(
            request.method,
            request.url.path,
            {name.lower(): value for name, value in request.headers.items()},
            request.content,
            api_key=KEY,
        )
        assert problem is None, problem
        if request.url.path.endswith("/account"):
            return httpx.Response(200, json={"accountId": ACCOUNT_ID, "name": "Shop"})
        return self.answers.pop(0)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


def _adapter(
    api: _Api, budget: _Budget | None = None, marks: _Marks | None = None
) -> GmiDestination:
    return GmiDestination(
        api_key=Secret(KEY),
        budget=budget or _Budget(),
        marks=marks or _Marks(),
        api_url="https://gmi.test/accounts/v3",
        credit_note_pattern=re.compile(DEFAULT_GMI_CREDIT_NOTE_PATTERN),
        tags=("relay", "shop"),
        transport=httpx.MockTransport(api),
    )


def _parcel(**changes: Any) -> Parcel:
    values: dict[str, Any] = {
        "sha256": "ab" * 32,
        "content": b"%PDF-1.4 an invoice",
        "filename": "RE-1001.pdf",
        "resend_count": 0,
        "original_sender": "Shop <shop@example.test>",
        "original_subject": "Your invoice",
        "original_date": NOW,
        "original_message_id": "<1@shop.example>",
    }
    values.update(changes)
    return Parcel(**values)


def test_an_upload_follows_the_schema_and_gives_a_receipt() -> None:
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 28716}))
    marks = _Marks()
    receipt = _adapter(api, marks=marks).deliver(_parcel(invoice_number="RE-1001"))
    assert (receipt.delivery_id, receipt.via) == ("28716", "getmyinvoices")
    (upload,) = api.bodies()
    assert upload["documentType"] == "SALES_INVOICE"
    assert upload["documentNumber"] == "RE-1001"
    assert upload["tags"] == ["relay", "shop"]
    assert upload["runOCR"] is True
    assert "<1@shop.example>" in upload["note"] and "shop@example.test" in upload["note"]
    assert marks.started == ["ab" * 32]
    assert all(r.headers["x-application"] == "invoice-relay" for r in api.requests)


def test_no_document_number_without_an_invoice_number() -> None:
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 1}))
    _adapter(api).deliver(_parcel())
    assert "documentNumber" not in api.bodies()[0]


def test_no_document_number_when_the_number_is_ambiguous(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first pages named several numbers: filing the first as the document's number
    # could be wrong, so none is sent, and the note and the log say why.
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 1}))
    parcel = _parcel(invoice_number="RE-1001", invoice_number_ambiguous=True)
    with caplog.at_level(logging.INFO, logger="worker.delivery.getmyinvoices"):
        receipt = _adapter(api).deliver(parcel)
    assert receipt.delivery_id == "1"
    (upload,) = api.bodies()  # checked against the schema by `_Api`
    assert "documentNumber" not in upload
    assert AMBIGUOUS_NUMBER in upload["note"]
    (logged,) = [r for r in caplog.records if getattr(r, "action", "") == "gmi_number_ambiguous"]
    assert "RE-1001" in logged.getMessage()


def test_the_note_is_quiet_about_a_number_read_unambiguously() -> None:
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 1}))
    _adapter(api).deliver(_parcel(invoice_number="RE-1001"))
    assert AMBIGUOUS_NUMBER not in api.bodies()[0]["note"]


def test_the_account_is_counted_as_a_call_not_as_an_upload() -> None:
    # GET /account names the destination only in its answer: counted after it, in the
    # call windows; only the upload spends from the hourly upload budget.
    budget = _Budget()
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 1}))
    _adapter(api, budget=budget).deliver(_parcel())
    assert budget.counted == [f"getmyinvoices:{ACCOUNT_ID}"]
    assert budget.spent == [True]  # the upload, spent before it was sent


@pytest.mark.parametrize(
    ("filename", "subject"), [("Gutschrift-17.pdf", "Invoice"), ("a.pdf", "Credit note 17")]
)
def test_a_credit_note_is_filed_as_one(filename: str, subject: str) -> None:
    api = _Api(httpx.Response(200, json={"success": True, "documentUid": 1}))
    _adapter(api).deliver(_parcel(filename=filename, original_subject=subject))
    assert api.bodies()[0]["documentType"] == "CREDIT_NOTE"


def test_a_started_upload_asks_first_and_is_not_repeated() -> None:
    api = _Api(httpx.Response(200, json={"success": True, "exists": True}))
    marks = _Marks()
    receipt = _adapter(api, marks=marks).deliver(_parcel(upload_started=True))
    assert (receipt.delivery_id, receipt.answer) == ("", ALREADY_THERE)
    assert [r.url.path for r in api.requests] == [
        "/accounts/v3/account",
        "/accounts/v3/documents/exists",
    ]
    assert marks.started == []


def test_already_there_is_delivered() -> None:
    api = _Api(httpx.Response(422, json={"success": False, "error_code": 127}))
    receipt = _adapter(api).deliver(_parcel())
    assert receipt.delivery_id == "" and receipt.answer == ALREADY_THERE


def test_a_spent_budget_sends_nothing() -> None:
    budget = _Budget()
    api = _Api()
    adapter = _adapter(api, budget=budget)
    adapter.open()
    budget.refuse = Hold(
        limit="the API's hourly upload limit", until=NOW + timedelta(hours=1), since=NOW
    )
    with pytest.raises(DeliveryThrottled) as raised:
        adapter.deliver(_parcel())
    assert "hourly" in raised.value.limit
    assert [r.url.path for r in api.requests] == ["/accounts/v3/account"]


def test_a_reported_limit_holds_every_sharer() -> None:
    budget = _Budget()
    api = _Api(httpx.Response(403, json={"code": 429}))
    with pytest.raises(DeliveryThrottled):
        _adapter(api, budget=budget).deliver(_parcel())
    assert budget.holds == ["the API's minute or day call limit"]


def test_a_lost_answer_is_uncertain_and_the_key_never_in_it() -> None:
    def lose(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/account"):
            return httpx.Response(200, json={"accountId": ACCOUNT_ID})
        raise httpx.ReadTimeout("timed out", request=request)

    adapter = GmiDestination(
        api_key=Secret(KEY),
        budget=_Budget(),
        marks=_Marks(),
        api_url="https://gmi.test/accounts/v3",
        transport=httpx.MockTransport(lose),
    )
    with pytest.raises(DeliveryUncertain) as raised:
        adapter.deliver(_parcel())
    assert KEY not in str(raised.value) and KEY not in repr(adapter)


def test_a_refused_key_names_its_cause() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"code": 407})

    adapter = GmiDestination(
        api_key=Secret(KEY),
        budget=_Budget(),
        marks=_Marks(),
        transport=httpx.MockTransport(refuse),
    )
    with pytest.raises(DestinationRefused, match="blocked") as raised:
        adapter.open()
    assert KEY not in str(raised.value)
