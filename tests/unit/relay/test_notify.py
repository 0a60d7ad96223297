"""Failure notices: the pure decisions by table, the notifier with fakes, the SQL queries on
SQLite, and the loop guard for a notice that comes back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.documents import DESTINATION, OWNER, poll_owner
from worker.delivery.message import NOTICE_HEADER, notice_message
from worker.errors import DeliveryRefused, DeliveryRejected, SessionRefused, StoreError
from worker.mail.verdicts import NOTICE_LOOP_REASON, loop_code, loop_reason
from worker.models import (
    DedupMode,
    MailHeaders,
    MailRecord,
    MailSummary,
    Notice,
    NoticeMark,
    PartRecord,
    Problem,
    ProblemKind,
    ReasonCode,
    SightingKind,
)
from worker.relay.notify import (
    LISTED_LIMIT,
    NoticeResult,
    Notifier,
    build_login_notice,
    build_notice,
    covered_sighting_id,
    notice_due,
    notice_subject,
)
from worker.store.engine import create_schema, make_engine
from worker.store.notices import SqlNoticeLog
from worker.store.sqlstore import SqlStore

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HOUR = 3600.0
NOTIFY_TO = "owner@shop.example"
NOTIFY_FROM = "relay@shop.example"


def problem(audit_id: int, kind: ProblemKind, reason: str = "why") -> Problem:
    return Problem(
        audit_id=audit_id,
        kind=kind,
        reason=reason,
        filename=f"{audit_id}.pdf",
        document_id=100 + audit_id if kind is ProblemKind.FAILED else None,
    )


# --- pure decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_age_seconds", "interval", "due"),
    [
        (None, HOUR, True),  # never notified
        (0, HOUR, False),
        (HOUR - 1, HOUR, False),
        (HOUR, HOUR, True),  # boundary
        (HOUR + 1, HOUR, True),
        (30, 10.0, True),
    ],
)
def test_notice_due(last_age_seconds: float | None, interval: float, due: bool) -> None:
    last = (
        None
        if last_age_seconds is None
        else NoticeMark(sent_at=T0 - timedelta(seconds=last_age_seconds), last_sighting_id=5)
    )
    assert notice_due(last, now=T0, interval_seconds=interval) is due


@pytest.mark.parametrize(
    ("problems", "previous", "expected"),
    [
        ([problem(7, ProblemKind.REJECTED)], 0, 7),
        ([problem(7, ProblemKind.ERROR), problem(9, ProblemKind.REJECTED)], 3, 9),
        ([problem(12, ProblemKind.FAILED)], 4, 4),  # a failed document moves no mark
        ([problem(2, ProblemKind.FAILED), problem(8, ProblemKind.ERROR)], 5, 8),
        ([], 6, 6),
    ],
)
def test_covered_sighting_id(problems: list[Problem], previous: int, expected: int) -> None:
    assert covered_sighting_id(problems, previous) == expected


@pytest.mark.parametrize(
    ("kinds", "subject"),
    [
        ([ProblemKind.FAILED], "invoice-relay (default): 1 failed - please have a look"),
        (
            [ProblemKind.REJECTED, ProblemKind.ERROR, ProblemKind.REJECTED],
            "invoice-relay (default): 2 rejected, 1 error - please have a look",
        ),
    ],
)
def test_notice_subject(kinds: list[ProblemKind], subject: str) -> None:
    assert notice_subject([problem(i, kind) for i, kind in enumerate(kinds, 1)]) == subject


@pytest.mark.parametrize(
    ("route", "named"),
    [
        ("shop-a", "shop-a"),
        ("shop\r\nBcc: x@evil.example", "shop Bcc: x@evil.example"),  # cleaned, one line
        ("r" * 100, "r" * 60),
    ],
)
def test_the_notice_names_its_route(route: str, named: str) -> None:
    built = build_notice(
        [problem(3, ProblemKind.REJECTED)],
        notify_from=NOTIFY_FROM,
        notify_to=NOTIFY_TO,
        mailbox="invoices@imap.example/INBOX",
        now=T0,
        interval_seconds=HOUR,
        route=route,
    )
    assert built.subject == f"invoice-relay ({named}): 1 rejected - please have a look"
    assert f"(route {named}, invoices@imap.example/INBOX)" in built.body


def notice(problems: Sequence[Problem]) -> EmailMessage:
    """The notice as the SMTP adapter sends it."""
    return notice_message(
        build_notice(
            problems,
            notify_from=NOTIFY_FROM,
            notify_to=NOTIFY_TO,
            mailbox="invoices@imap.example/INBOX",
            now=T0,
            interval_seconds=HOUR,
        )
    )


def test_the_notice_is_a_short_automatic_mail_without_attachments() -> None:
    message = notice(
        [
            problem(3, ProblemKind.REJECTED, "not a PDF"),
            problem(4, ProblemKind.FAILED, "550 5.7.1 refused"),
        ]
    )
    assert (message["From"], message["To"]) == (NOTIFY_FROM, NOTIFY_TO)
    assert message["Auto-Submitted"] == "auto-generated"
    assert message[NOTICE_HEADER] == "v1; rows=2"
    assert message["Message-ID"].endswith("@shop.example>")
    assert not message.is_multipart()
    body = message.get_content()
    assert "       3  rejected   3.pdf: not a PDF" in body
    assert "       4  failed     4.pdf: 550 5.7.1 refused" in body
    assert "invoice-relay audit --outcome failed" in body


def test_text_from_mail_cannot_break_lines_or_headers() -> None:
    hostile = Problem(
        audit_id=1,
        kind=ProblemKind.REJECTED,
        reason="bad\r\nBcc: victim@example.com",
        filename="x\n.pdf",
    )
    body = notice([hostile]).get_content()
    assert "\nBcc:" not in body
    assert "bad Bcc: victim@example.com" in body


def test_a_long_list_is_cut_and_counted() -> None:
    many = [problem(i, ProblemKind.REJECTED) for i in range(1, LISTED_LIMIT + 8)]
    body = notice(many).get_content()
    assert f"rejected     {LISTED_LIMIT + 7}" in body
    assert "... and 7 more" in body
    assert f"{LISTED_LIMIT + 1}.pdf" not in body


def test_an_empty_notice_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        notice([])


# --- the notifier, with fakes --------------------------------------------------------------


@dataclass
class FakeNoticeLog:
    last: NoticeMark | None = None
    problems: list[Problem] = field(default_factory=list)
    recorded: list[tuple[int, list[Problem]]] = field(default_factory=list)
    holder: str | None = None  # the notice lease's owner
    lose_lease: bool = False  # another process takes the lease over while this one sends
    fail: bool = False

    def take(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        assert mailbox == "m"
        if self.fail:
            raise StoreError("database down")
        if self.holder not in (None, owner):
            return False
        self.holder = owner
        return True

    def still_holds(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        if self.lose_lease:
            self.holder = "other"
        return self.holder == owner

    def release(self, mailbox: str, *, owner: str) -> None:
        if self.holder == owner:
            self.holder = None

    def last_notice(self, mailbox: str) -> NoticeMark | None:
        return self.last

    def unnotified(self, mailbox: str, *, limit: int) -> list[Problem]:
        told = {p.audit_id for _, covered in self.recorded for p in covered}
        return [p for p in self.problems if p.audit_id not in told][:limit]

    def record(
        self,
        *,
        mailbox: str,
        owner: str,
        sent_at: datetime,
        recipient: str,
        last_sighting_id: int,
        problems: Sequence[Problem],
    ) -> None:
        assert (mailbox, recipient) == ("m", NOTIFY_TO)
        self.recorded.append((last_sighting_id, list(problems)))
        self.last = NoticeMark(sent_at=sent_at, last_sighting_id=last_sighting_id)
        self.release(mailbox, owner=owner)


@dataclass
class FakeSender:
    sent: list[tuple[EmailMessage, str | None]] = field(default_factory=list)
    refuse: Exception | None = None
    closed: int = 0

    def open(self) -> None:
        if isinstance(self.refuse, SessionRefused):
            raise self.refuse

    def send_notice(self, notice: Notice) -> str:
        if isinstance(self.refuse, DeliveryRefused):
            raise self.refuse
        self.sent.append((notice_message(notice), notice.recipient))
        return "250 ok"

    def close(self) -> None:
        self.closed += 1


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def notifier(log: FakeNoticeLog, sender: FakeSender, clock: Clock) -> Notifier:
    return Notifier(
        log=log,
        sender=lambda: sender,
        notify_to=NOTIFY_TO,
        notify_from=NOTIFY_FROM,
        mailbox="m",
        owner=OWNER,
        interval_seconds=HOUR,
        clock=clock,
    )


def test_one_notice_then_nothing_until_the_interval_is_over_and_never_the_same_rows() -> None:
    log = FakeNoticeLog(problems=[problem(2, ProblemKind.REJECTED), problem(5, ProblemKind.ERROR)])
    sender, clock = FakeSender(), Clock()
    relay = notifier(log, sender, clock)

    assert relay.after_poll() is NoticeResult.SENT
    ((message, recipient),) = sender.sent
    assert recipient == NOTIFY_TO
    assert message[NOTICE_HEADER]
    assert log.recorded == [(5, log.problems)]
    assert sender.closed == 1

    log.problems.append(problem(9, ProblemKind.REJECTED))
    clock.now += timedelta(minutes=59)
    assert relay.after_poll() is NoticeResult.NOT_DUE
    clock.now += timedelta(minutes=1)
    assert relay.after_poll() is NoticeResult.SENT
    assert [p.audit_id for p in log.recorded[-1][1]] == [9]

    clock.now += timedelta(hours=2)
    assert relay.after_poll() is NoticeResult.NOTHING_NEW
    assert len(sender.sent) == 2
    assert log.holder is None  # the lease is handed back whatever the outcome


def test_a_notice_another_process_is_sending_is_left_to_it() -> None:
    log = FakeNoticeLog(problems=[problem(2, ProblemKind.REJECTED)], holder="other")
    sender = FakeSender()
    assert notifier(log, sender, Clock()).after_poll() is NoticeResult.BUSY
    assert sender.sent == []
    assert log.holder == "other"


def test_a_notifier_that_lost_its_lease_before_sending_sends_nothing() -> None:
    # Frozen past the lease after reading the rows: the process that took over sends.
    log = FakeNoticeLog(problems=[problem(2, ProblemKind.REJECTED)], lose_lease=True)
    sender = FakeSender()
    assert notifier(log, sender, Clock()).after_poll() is NoticeResult.BUSY
    assert sender.sent == []
    assert log.recorded == []
    assert sender.closed == 1
    assert log.holder == "other"


@pytest.mark.parametrize(
    "refusal",
    [
        SessionRefused("connection refused", host="smtp", port=25),
        DeliveryRejected("550 no", code=550),
    ],
)
def test_a_refused_notice_is_not_recorded_and_is_tried_after_a_later_poll(
    refusal: Exception,
) -> None:
    log = FakeNoticeLog(problems=[problem(2, ProblemKind.FAILED)])
    sender, clock = FakeSender(refuse=refusal), Clock()
    relay = notifier(log, sender, clock)
    assert relay.after_poll() is NoticeResult.FAILED
    assert log.recorded == []
    assert sender.closed == 1
    assert log.holder is None
    sender.refuse = None
    assert relay.after_poll() is NoticeResult.SENT


REFUSED = (
    "The OAuth2 grant was refused (invalid_grant): AADSTS50173; the default route: run "
    "`invoice-relay oauth login` or replace INVOICE_RELAY_OAUTH_REFRESH_TOKEN"
)


def test_a_login_notice_names_the_mailbox_and_the_fix_and_covers_no_rows() -> None:
    notice = build_login_notice(
        REFUSED + "\x1b[2J",
        notify_from=NOTIFY_FROM,
        notify_to=NOTIFY_TO,
        mailbox="invoices@shop.example",
        now=T0,
        interval_seconds=HOUR,
    )
    assert notice.subject == "invoice-relay: cannot log in to invoices@shop.example - please act"
    assert REFUSED in notice.body
    assert "\x1b" not in notice.body  # the reason is cleaned like any other text
    assert notice.rows == 0
    assert notice_message(notice)[NOTICE_HEADER] == "v1; rows=0"


def test_a_login_notice_then_none_until_the_interval_is_over() -> None:
    log = FakeNoticeLog(last=NoticeMark(sent_at=T0 - timedelta(days=1), last_sighting_id=7))
    sender, clock = FakeSender(), Clock()
    relay = notifier(log, sender, clock)

    assert relay.after_login_failure(REFUSED) is NoticeResult.SENT
    ((message, recipient),) = sender.sent
    assert recipient == NOTIFY_TO
    assert "invoice-relay oauth login" in message.get_content()
    assert log.recorded == [(7, [])]  # the rows' high-water mark stays where it was
    clock.now += timedelta(minutes=59)
    assert relay.after_login_failure(REFUSED) is NoticeResult.NOT_DUE
    assert relay.after_poll() is NoticeResult.NOT_DUE  # one interval for every notice
    clock.now += timedelta(minutes=1)
    assert relay.after_login_failure(REFUSED) is NoticeResult.SENT
    assert len(sender.sent) == 2


def test_a_login_notice_that_cannot_go_is_reported_not_raised() -> None:
    sender = FakeSender(refuse=SessionRefused("connection refused", host="smtp", port=25))
    log = FakeNoticeLog()
    assert notifier(log, sender, Clock()).after_login_failure(REFUSED) is NoticeResult.FAILED
    assert log.recorded == []
    assert (
        notifier(FakeNoticeLog(fail=True), FakeSender(), Clock()).after_login_failure(REFUSED)
        is NoticeResult.FAILED
    )


def test_a_database_failure_is_reported_not_raised() -> None:
    relay = notifier(FakeNoticeLog(fail=True), FakeSender(), Clock())
    assert relay.after_poll() is NoticeResult.FAILED


# --- the queries, on SQLite --------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    opened = SqlStore(url)
    try:
        yield opened
    finally:
        opened.close()


def record(store: SqlStore, uid: int, *parts: PartRecord) -> list[int]:
    recorded = store.record_mails(
        destination=DESTINATION,
        owner=poll_owner(store, "m"),
        mailbox="m",
        uidvalidity=1,
        mails=[MailRecord(uid=uid, headers=MailHeaders(subject="s"), parts=parts)],
        advance_to=uid,
        dedup=DedupMode.BYTES,
        keep_pdfs=False,
        now=T0,
    )
    return [item.sighting_id for item in recorded]


def accepted(text: str) -> PartRecord:
    data = f"%PDF-1.4 {text}".encode()
    return PartRecord(
        part="2",
        kind=SightingKind.DOCUMENT,
        filename=f"{text}.pdf",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
    )


def rejected(reason: str, code: ReasonCode | None = None) -> PartRecord:
    return PartRecord(
        part="2", kind=SightingKind.REJECTED, reason=reason, reason_code=code, filename="x.pdf"
    )


def test_the_queries_list_each_problem_row_until_a_notice_covered_it(store: SqlStore) -> None:
    log = SqlNoticeLog(store.engine)
    (forwarded,) = record(store, 1, accepted("fine"))
    (failing,) = record(store, 2, accepted("refused"))
    (stranger,) = record(store, 3, rejected("sender not allowed"))
    (broken,) = record(store, 4, PartRecord(part="2", kind=SightingKind.ERROR, reason="timeout"))
    # Our own notice come back: left out by its code, whatever its text says.
    record(store, 5, rejected(NOTICE_LOOP_REASON, ReasonCode.NOTICE_LOOP))
    record(store, 8, rejected("reworded", ReasonCode.NOTICE_LOOP))
    record(store, 6, PartRecord(part="", kind=SightingKind.NO_PDF))
    documents = {
        d.filename: d
        for d in store.claim_due(mailbox="m", owner=OWNER, now=T0, limit=10, lease_seconds=60)
    }
    store.mark_forwarded(
        documents["fine.pdf"].document_id,
        owner=OWNER,
        message_id="<a@b>",
        answer="250",
        now=T0,
        keep_pdf=False,
    )
    store.mark_failed(documents["refused.pdf"].document_id, owner=OWNER, answer="550 5.7.1 no")

    assert log.last_notice("m") is None
    problems = log.unnotified("m", limit=100)
    assert [(p.audit_id, p.kind) for p in problems] == [
        (failing, ProblemKind.FAILED),
        (stranger, ProblemKind.REJECTED),
        (broken, ProblemKind.ERROR),
    ]
    assert problems[0].reason == "550 5.7.1 no"
    assert problems[0].document_id == documents["refused.pdf"].document_id
    assert forwarded not in [p.audit_id for p in problems]
    assert log.unnotified("other@imap.example/INBOX", limit=100) == []  # another mailbox's

    assert log.take("m", owner=OWNER, lease_seconds=60)
    log.record(
        mailbox="m",
        owner=OWNER,
        sent_at=T0,
        recipient=NOTIFY_TO,
        last_sighting_id=broken,
        problems=problems,
    )
    assert log.last_notice("m") == NoticeMark(sent_at=T0, last_sighting_id=broken)
    assert log.last_notice("other@imap.example/INBOX") is None  # its interval is its own
    assert log.unnotified("m", limit=100) == []
    assert log.take("m", owner="another", lease_seconds=60)  # recording handed it back
    # Recording the same rows again (a repeated notice) is harmless; the mark never falls.
    log.record(
        mailbox="m",
        owner=OWNER,
        sent_at=T0,
        recipient=NOTIFY_TO,
        last_sighting_id=0,
        problems=problems,
    )
    assert log.last_notice("m") == NoticeMark(sent_at=T0, last_sighting_id=broken)

    (later,) = record(store, 7, rejected("not a PDF"))
    assert [p.audit_id for p in log.unnotified("m", limit=100)] == [later]


def test_the_limit_leaves_the_rest_for_the_next_notice(store: SqlStore) -> None:
    log = SqlNoticeLog(store.engine)
    ids = [record(store, uid, rejected(f"r{uid}"))[0] for uid in range(1, 6)]
    first = log.unnotified("m", limit=2)
    assert [p.audit_id for p in first] == ids[:2]
    log.record(
        mailbox="m",
        owner=OWNER,
        sent_at=T0,
        recipient=NOTIFY_TO,
        last_sighting_id=covered_sighting_id(first, 0),
        problems=first,
    )
    assert [p.audit_id for p in log.unnotified("m", limit=10)] == ids[2:]


def test_one_owner_holds_a_mailboxs_notice_lease_until_it_hands_it_back(store: SqlStore) -> None:
    log = SqlNoticeLog(store.engine)
    assert log.take("m", owner="a", lease_seconds=60)
    assert not log.take("m", owner="b", lease_seconds=60)
    assert log.take("other", owner="b", lease_seconds=60)  # per mailbox
    assert log.still_holds("m", owner="a", lease_seconds=60)
    assert not log.still_holds("m", owner="b", lease_seconds=60)
    log.release("m", owner="b")  # not b's: nothing happens
    assert not log.take("m", owner="b", lease_seconds=60)
    log.release("m", owner="a")
    assert log.take("m", owner="b", lease_seconds=60)
    assert not log.still_holds("m", owner="a", lease_seconds=60)


def test_an_expired_notice_lease_is_taken_over_and_the_heartbeat_renews_a_live_one(
    store: SqlStore,
) -> None:
    log = SqlNoticeLog(store.engine)
    assert log.take("m", owner="dead", lease_seconds=-1)  # expired at once
    assert log.take("m", owner="live", lease_seconds=60)
    assert not log.still_holds("m", owner="dead", lease_seconds=60)
    assert store.renew("live", lease_seconds=60) == 1
    assert store.release_all("live") == 0  # no documents; the notice lease goes too
    assert log.take("m", owner="next", lease_seconds=60)


# --- the loop guard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected", "code"),
    [
        (MailHeaders(notice_marker="v1; rows=2"), NOTICE_LOOP_REASON, ReasonCode.NOTICE_LOOP),
        (
            MailHeaders(notice_marker="v1", relay_marker="x"),
            NOTICE_LOOP_REASON,
            ReasonCode.NOTICE_LOOP,
        ),
        (
            MailHeaders(relay_marker="x"),
            "loop: carries the X-Invoice-Relay header of a forwarded mail",
            None,
        ),
        (MailHeaders(sender_address="someone@else.example"), None, None),
    ],
)
def test_a_notice_that_comes_back_is_a_loop(
    headers: MailHeaders, expected: str | None, code: ReasonCode | None
) -> None:
    summary = MailSummary(uid=1, size=10, internaldate=None, headers=headers, structure=None)
    assert loop_reason(summary, NOTIFY_FROM) == expected
    assert loop_code(summary) is code
