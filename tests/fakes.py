"""In-memory fakes of the adapters, passed to the pipeline through its constructor."""

from __future__ import annotations

import email
import email.policy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage, Message

from worker.auth.grants import Deadline, Grant
from worker.delivery.message import ForwardMail
from worker.errors import (
    MailboxError,
    PdfCheckFailed,
    SendRejected,
    SessionRefused,
    TokenEndpointError,
)
from worker.mail import headers
from worker.models import BodyPart, FolderStatus, MailSummary, PdfReport
from worker.tokens import AccessToken


def _params(message: Message, header: str) -> dict[str, str]:
    pairs = message.get_params(header=header, failobj=[]) or []
    result: dict[str, str] = {}
    for key, value in pairs[1:]:
        text = email.utils.collapse_rfc2231_value(value) if isinstance(value, tuple) else value
        result[key.lower()] = str(text)
    return result


def structure_of(message: Message, section: str = "") -> BodyPart:
    """The BodyPart tree an IMAP server would describe for `message` (RFC 3501 sections)."""
    if not section and message.get_content_type() == "message/rfc822":
        section = "1"  # a mail that is one attached mail: its body is part 1
    children: list[BodyPart] = []
    if message.is_multipart():
        payload = message.get_payload()
        assert isinstance(payload, list)
        if message.get_content_type() == "message/rfc822":
            inner = payload[0]
            assert isinstance(inner, Message)
            inner_root = f"{section}.1" if section else "1"
            if inner.is_multipart():
                children = list(structure_of(inner, section).children)
            else:
                children = [structure_of(inner, inner_root)]
        else:
            for index, child in enumerate(payload, start=1):
                assert isinstance(child, Message)
                child_section = f"{section}.{index}" if section else str(index)
                children.append(structure_of(child, child_section))
    elif not section:
        section = "1"
    raw = message.get_payload(decode=False)
    size = len(raw.encode("utf-8", "surrogateescape")) if isinstance(raw, str) else 0
    disposition = message.get_content_disposition()
    return BodyPart(
        section=section,
        content_type=message.get_content_type(),
        params=_params(message, "content-type"),
        disposition=disposition,
        disposition_params=_params(message, "content-disposition") if disposition else {},
        encoding=str(message.get("Content-Transfer-Encoding", "7bit")).strip().lower(),
        size=size,
        children=tuple(children),
    )


def _leaves(message: Message, section: str = "") -> dict[str, Message]:
    if not section and message.get_content_type() == "message/rfc822":
        section = "1"
    found: dict[str, Message] = {}
    if message.is_multipart():
        payload = message.get_payload()
        assert isinstance(payload, list)
        if message.get_content_type() == "message/rfc822":
            inner = payload[0]
            assert isinstance(inner, Message)
            if inner.is_multipart():
                found.update(_leaves(inner, section))
            else:
                found[f"{section}.1"] = inner
        else:
            for index, child in enumerate(payload, start=1):
                assert isinstance(child, Message)
                found.update(_leaves(child, f"{section}.{index}" if section else str(index)))
    else:
        found[section or "1"] = message
    return found


@dataclass(slots=True)
class _StoredMail:
    uid: int
    raw: bytes
    received: datetime


class FakeMailbox:
    """A folder of raw mails; `fail_on` makes an operation raise MailboxError."""

    def __init__(self, *, uidvalidity: int = 1000) -> None:
        self.uidvalidity = uidvalidity
        self.mails: dict[int, _StoredMail] = {}
        self.next_uid = 1
        self.calls: list[str] = []
        self.fail_on: set[str] = set()
        self.opened = False
        self.whole_fetches: list[tuple[int, str]] = []  # sections fetched without a limit
        self.unreadable: set[int] = set()  # UIDs whose structure the server cannot describe
        self.hostile_structure: set[int] = set()  # UIDs whose structure is nested absurdly
        self.whole_mails: list[int] = []  # UIDs fetched whole (BODY.PEEK[])

    def add(self, raw: bytes, *, received: datetime | None = None) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.mails[uid] = _StoredMail(uid, raw, received or datetime(2026, 11, 1, tzinfo=UTC))
        return uid

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_on:
            raise MailboxError("connection lost", host="fake", port=143)

    def open(self) -> FolderStatus:
        self._call("open")
        self.opened = True
        return FolderStatus(
            uidvalidity=self.uidvalidity, uidnext=self.next_uid, exists=len(self.mails)
        )

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        self._call("new_uids")
        return sorted(
            uid
            for uid, mail in self.mails.items()
            if uid > after_uid and (since is None or mail.received.date() >= since)
        )

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        self._call("summaries")
        result = []
        for uid in uids:
            mail = self.mails.get(uid)
            if mail is None:
                continue
            parsed = email.message_from_bytes(mail.raw, policy=email.policy.compat32)
            header_block = mail.raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            result.append(
                MailSummary(
                    uid=uid,
                    size=len(mail.raw),
                    internaldate=mail.received,
                    headers=headers.parse_headers(header_block),
                    structure=None
                    if uid in self.unreadable | self.hostile_structure
                    else structure_of(parsed),
                    structure_problem="nested more than 40 levels deep"
                    if uid in self.hostile_structure
                    else None,
                )
            )
        return result

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        self._call("fetch_sections")
        result: dict[tuple[int, str], bytes] = {}
        for uid, sections in wanted.items():
            mail = self.mails.get(uid)
            if mail is None:
                continue
            leaves = _leaves(email.message_from_bytes(mail.raw, policy=email.policy.compat32))
            for section in sections:
                part = leaves.get(section)
                if part is None:
                    continue
                payload = part.get_payload(decode=False)
                data = str(payload).encode("utf-8", "surrogateescape")
                if max_bytes is None:
                    self.whole_fetches.append((uid, section))
                result[(uid, section)] = data[:max_bytes] if max_bytes else data
        return result

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        """`length` raw octets of one section from `offset` (`worker.mail.ranged.RangedFetch`)."""
        self._call("fetch_range")
        whole = self.fetch_sections({uid: [section]}).get((uid, section))
        return None if whole is None else whole[offset : offset + length]

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        self._call("fetch_messages")
        self.whole_mails.extend(uid for uid in uids if uid in self.mails)
        return {uid: self.mails[uid].raw for uid in uids if uid in self.mails}

    def close(self) -> None:
        self.calls.append("close")
        self.opened = False


class FakeOutbox:
    """Keeps what it 'sent'; `answers` scripts refusals per send, in order."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.answers: list[SendRejected | SessionRefused | None] = []
        self.refuse_session = False
        self.opened = 0
        self.closed = 0

    def open(self) -> None:
        if self.refuse_session:
            raise SessionRefused("connection refused", host="fake", port=25)
        self.opened += 1

    def send(self, message: ForwardMail, *, before_end: Callable[[], None] | None = None) -> str:
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, SessionRefused):  # refused before the content
            raise answer
        if before_end is not None:
            before_end()
        if answer is not None:
            raise answer
        self.sent.append(message.parsed())
        return "250 2.0.0 queued"

    def close(self) -> None:
        self.closed += 1

    def sent_hashes(self) -> list[str]:
        return [str(m["X-Invoice-Relay"]) for m in self.sent]


def simple_check(data: bytes) -> PdfReport:
    """A stand-in for pypdf: a PDF is bytes starting with %PDF- and ending with %%EOF."""
    if not data.lstrip().startswith(b"%PDF-"):
        return PdfReport(accepted=False, reason="not a PDF")
    if b"%%EOF" not in data[-64:]:
        return PdfReport(accepted=False, reason="unparseable PDF: truncated")
    body = data.split(b"\n", 1)[-1]
    return PdfReport(accepted=True, pages=1, fingerprint="fp1:" + hashlib.sha256(body).hexdigest())


class FakeInspector:
    """Runs `check` in-process; files listed in `crash_on` yield PdfCheckFailed."""

    def __init__(self, check: Callable[[bytes], PdfReport] = simple_check) -> None:
        self.check = check
        self.crash_on: set[bytes] = set()
        self.inspected = 0

    def inspect_many(self, files: Iterable[bytes]) -> list[PdfReport | Exception]:
        result: list[PdfReport | Exception] = []
        for data in files:
            self.inspected += 1
            if data in self.crash_on:
                result.append(PdfCheckFailed("worker died"))
            else:
                result.append(self.check(data))
        return result

    def close(self) -> None:
        pass


class FakeGrantor:
    """A token endpoint in memory (worker.auth.grants.Grantor): numbered tokens, a
    rotating refresh token, and an error to raise instead when `refuse` is set."""

    def __init__(self, *, lifetime_seconds: float = 3600.0, rotate: bool = True) -> None:
        self.lifetime_seconds = lifetime_seconds
        self.rotate = rotate
        self.spent: list[str | None] = []  # the refresh token each grant was given
        self.refuse: TokenEndpointError | None = None
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def grant(self, *, refresh_token: str | None, deadline: Deadline) -> Grant:
        if self.refuse is not None:
            raise self.refuse
        self.spent.append(refresh_token)
        number = len(self.spent)
        return Grant(
            access=AccessToken(
                value=f"at-fake-{number}",
                expires_at=self.now() + timedelta(seconds=self.lifetime_seconds),
            ),
            refresh_token=f"rt-fake-{number}" if self.rotate else None,
        )
