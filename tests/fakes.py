"""In-memory fakes of the adapters, passed to the pipeline through its constructor."""

from __future__ import annotations

import email
import email.policy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage, Message

from worker.auth.grants import Deadline, Grant
from worker.delivery.message import build_forward
from worker.errors import (
    DeliveryRefused,
    DeliveryUnavailable,
    DestinationAmbiguous,
    LeaseLost,
    MailboxError,
    PdfCheckFailed,
    SessionRefused,
    TokenEndpointError,
)
from worker.mail import headers
from worker.models import (
    DEFAULT_ROUTE,
    AttemptOutcome,
    AuditFilter,
    AuditPage,
    AuditRow,
    AuditSearch,
    BodyPart,
    DedupMode,
    DeliveryAttempt,
    DocumentState,
    DocumentStory,
    FolderStatus,
    MailboxPosition,
    MailHeaders,
    MailRecord,
    MailSummary,
    Outcome,
    OutgoingDocument,
    Parcel,
    PartRecord,
    PdfReport,
    QueuedDocument,
    Receipt,
    RecordedSighting,
    RouteOverview,
    RouteScope,
    SightingKind,
    UntidiedMail,
    WebSession,
)
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
    """A `Destination` that keeps what it 'sent' as the mail SMTP would carry;
    `answers` scripts refusals per delivery, in order."""

    forward_to = "archive@example.org"
    forward_from = "relay@example.com"

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.followed: list[bool] = []  # each delivery's `more_follows`
        self.answers: list[DeliveryRefused | DeliveryUnavailable | None] = []
        self.refuse_session = False
        self.opened = 0
        self.closed = 0

    def open(self) -> None:
        if self.refuse_session:
            raise SessionRefused("connection refused", host="fake", port=25)
        self.opened += 1

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        self.followed.append(more_follows)
        message = build_forward(parcel, forward_to=self.forward_to, forward_from=self.forward_from)
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, DeliveryUnavailable):  # refused before the content
            raise answer
        if before_final is not None:
            before_final()
        if answer is not None:
            raise answer
        self.sent.append(message.parsed())
        return Receipt(delivery_id=message.message_id, answer="250 2.0.0 queued")

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


@dataclass(slots=True, kw_only=True)
class _Sighting:
    id: int
    mailbox: str
    uidvalidity: int
    uid: int
    part: str
    received_at: datetime
    headers: MailHeaders
    record: PartRecord
    kind: SightingKind
    reason: str | None
    document_id: int | None = None
    duplicate_of: int | None = None
    tries: int = 1
    route: str = DEFAULT_ROUTE


@dataclass(slots=True, kw_only=True)
class _Document:
    id: int
    destination: str | None  # None: older than destinations, known to all
    mailbox: str | None  # the folder whose mail introduced it
    sha256: str
    content_key: str | None
    filename: str | None
    state: DocumentState = DocumentState.PENDING
    attempts: int = 0
    next_attempt_at: datetime
    lease_until: datetime | None = None
    lease_owner: str | None = None
    resend_count: int = 0
    content: bytes | None = None  # None once dropped after forwarding
    forwarded_at: datetime | None = None
    forwarded_message_id: str | None = None
    last_answer: str | None = None
    # Every try, as `delivery_attempts` keeps them (unbounded here), oldest first.
    history: list[DeliveryAttempt] = field(default_factory=list)


class FakeStore:
    """Every store Protocol (`PollStore`, `SendQueue`, `Leases`, `AuditReader`,
    `AdminStore`) in memory, for tests of what uses the store rather than of SQL. It keeps
    the rules that `tests/unit/store/test_contract.py` checks against `SqlStore` too: a
    sighting per (mailbox, uidvalidity, uid, part), replaced only while it is an ERROR; a
    document per (destination, sha256) and per (destination, content key), the later
    sighting a DUPLICATE naming the key; only the introducing folder's documents
    claimed for sending; leases with an owner and an expiry on `clock` (the database's clock of
    `SqlStore`), every write under one fenced by its owner (`LeaseLost`, nothing
    changed)."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        # The "database's clock" on which leases expire; the real one unless a test
        # moves it, so that the contract test can run one expiry against both stores.
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self._positions: dict[str, MailboxPosition] = {}
        self.sightings: dict[int, _Sighting] = {}
        self.documents: dict[int, _Document] = {}
        self.poll_leases: dict[str, tuple[str, datetime]] = {}  # mailbox: (owner, expiry)

    # --- Leases ------------------------------------------------------------------------

    def take_poll_lease(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        """As `SqlStore.take_poll_lease`: False while another owner's lease runs; an
        expired lease is taken over, the owner's own renewed."""
        held = self.poll_leases.get(mailbox)
        now = self.clock()
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self.poll_leases[mailbox] = (owner, now + timedelta(seconds=lease_seconds))
        return True

    def end_poll_lease(self, mailbox: str, *, owner: str) -> None:
        held = self.poll_leases.get(mailbox)
        if held is not None and held[0] == owner:
            del self.poll_leases[mailbox]

    def _fence_poll(self, mailbox: str, owner: str) -> None:
        held = self.poll_leases.get(mailbox)
        if held is None or held[0] != owner or held[1] <= self.clock():
            raise LeaseLost(f"the poll lease of {mailbox}")

    def _holds(self, document: _Document, owner: str) -> bool:
        return (
            document.lease_owner == owner
            and document.lease_until is not None
            and document.lease_until > self.clock()
        )

    def _leased(
        self,
        document_id: int,
        owner: str,
        attempt: tuple[AttemptOutcome, str, str] | None = None,
    ) -> _Document:
        """The document, ending its lease and keeping `attempt` (outcome, answer, via) in
        its history; `LeaseLost` (nothing changed) unless `owner` holds it."""
        document = self.documents[document_id]
        if not self._holds(document, owner):
            raise LeaseLost(f"document {document_id}")
        document.lease_until = None
        document.lease_owner = None
        if attempt is not None:
            outcome, answer, via = attempt
            document.history.append(
                DeliveryAttempt(attempted_at=self.clock(), outcome=outcome, answer=answer, via=via)
            )
        return document

    def still_holds(self, document_id: int, *, owner: str, lease_seconds: float) -> bool:
        document = self.documents[document_id]
        if not self._holds(document, owner):
            return False
        document.lease_until = self.clock() + timedelta(seconds=lease_seconds)
        return True

    def renew(self, owner: str, *, lease_seconds: float) -> int:
        until = self.clock() + timedelta(seconds=lease_seconds)
        renewed = 0
        for document in self.documents.values():
            if self._holds(document, owner):
                document.lease_until = until
                renewed += 1
        now = self.clock()
        for mailbox, (holder, expiry) in list(self.poll_leases.items()):
            if holder == owner and expiry > now:
                self.poll_leases[mailbox] = (owner, until)
                renewed += 1
        return renewed

    def release_all(self, owner: str) -> int:
        released = 0
        for document in self.documents.values():
            if document.lease_owner == owner:
                document.lease_until = None
                document.lease_owner = None
                released += 1
        for mailbox, (holder, _) in list(self.poll_leases.items()):
            if holder == owner:
                del self.poll_leases[mailbox]
        return released

    # --- PollStore ---------------------------------------------------------------------

    def position(self, mailbox: str) -> MailboxPosition | None:
        return self._positions.get(mailbox)

    def reset_position(self, mailbox: str, uidvalidity: int, *, owner: str) -> None:
        self._fence_poll(mailbox, owner)
        self._positions[mailbox] = MailboxPosition(
            mailbox=mailbox, uidvalidity=uidvalidity, last_uid=0
        )

    def record_mails(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        mails: Sequence[MailRecord],
        advance_to: int | None,
        dedup: DedupMode,
        keep_pdfs: bool,
        now: datetime,
        owner: str,
        destination: str,
        route: str = DEFAULT_ROUTE,
    ) -> list[RecordedSighting]:
        del keep_pdfs  # as in SqlStore: the bytes are kept until the document is forwarded
        for mail in mails:
            for part in mail.parts:
                if part.kind is SightingKind.DOCUMENT and (
                    part.sha256 is None or part.content is None
                ):
                    raise ValueError(
                        f"uid {mail.uid} part {part.part!r}: a DOCUMENT needs sha256 and bytes"
                    )
        self._fence_poll(mailbox, owner)
        whole = {mail.uid for mail in mails if all(part.part for part in mail.parts)}
        for sighting in list(self.sightings.values()):
            if (
                (sighting.mailbox, sighting.uidvalidity) == (mailbox, uidvalidity)
                and sighting.uid in whole
                and sighting.part == ""
                and sighting.kind is SightingKind.ERROR
            ):
                del self.sightings[sighting.id]
        recorded = [
            self._record_part(
                mailbox=mailbox,
                uidvalidity=uidvalidity,
                mail=mail,
                part=part,
                dedup=dedup,
                now=now,
                route=route,
                destination=destination,
            )
            for mail in mails
            for part in mail.parts
        ]
        if advance_to is not None:
            current = self._positions.get(mailbox)
            if (
                current is None
                or current.uidvalidity != uidvalidity
                or current.last_uid < advance_to
            ):
                self._positions[mailbox] = MailboxPosition(
                    mailbox=mailbox, uidvalidity=uidvalidity, last_uid=advance_to
                )
        return recorded

    def _record_part(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        mail: MailRecord,
        part: PartRecord,
        dedup: DedupMode,
        now: datetime,
        route: str,
        destination: str,
    ) -> RecordedSighting:
        location = (mailbox, uidvalidity, mail.uid, part.part)
        existing = next(
            (
                s
                for s in self.sightings.values()
                if (s.mailbox, s.uidvalidity, s.uid, s.part) == location
            ),
            None,
        )
        if existing is not None and existing.kind is not SightingKind.ERROR:
            return _recorded(existing, inserted=False)
        sighting = _Sighting(
            id=existing.id if existing else max(self.sightings, default=0) + 1,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            uid=mail.uid,
            part=part.part,
            received_at=existing.received_at if existing else now,
            headers=mail.headers,
            record=part,
            kind=part.kind,
            reason=part.reason,
            tries=existing.tries + 1 if existing else 1,
            route=route,
        )
        self.sightings[sighting.id] = sighting
        if part.kind is SightingKind.DOCUMENT:
            assert part.sha256 is not None
            content_key = part.fingerprint if dedup is DedupMode.CONTENT else None
            known = self._known(part.sha256, content_key, destination)
            if known is None:
                document = _Document(
                    id=max(self.documents, default=0) + 1,
                    destination=destination,
                    mailbox=mailbox,
                    sha256=part.sha256,
                    content_key=content_key,
                    filename=part.filename,
                    next_attempt_at=now,
                    content=part.content,
                )
                self.documents[document.id] = document
                sighting.document_id = document.id
            else:
                document_id, key = known
                introduced_by = min(
                    s.id
                    for s in self.sightings.values()
                    if s.document_id == document_id and s.kind is SightingKind.DOCUMENT
                )
                sighting.kind = SightingKind.DUPLICATE
                sighting.reason = f"same {key} as sighting {introduced_by}"
                sighting.document_id = document_id
                sighting.duplicate_of = introduced_by
        return _recorded(sighting, inserted=True)

    def _known(
        self, sha256: str, content_key: str | None, destination: str | None
    ) -> tuple[int, str] | None:
        there = [d for d in self.documents.values() if d.destination in (None, destination)]
        for document in there:
            if document.sha256 == sha256:
                return document.id, "sha256"
        for document in there:
            if content_key is not None and document.content_key == content_key:
                return document.id, "content fingerprint"
        return None

    def _errors(self, mailbox: str, uidvalidity: int | None = None) -> list[_Sighting]:
        return [
            s
            for s in self.sightings.values()
            if s.mailbox == mailbox
            and s.kind is SightingKind.ERROR
            and uidvalidity in (None, s.uidvalidity)
        ]

    def error_uids(self, *, mailbox: str, uidvalidity: int, max_tries: int) -> list[int]:
        errors = self._errors(mailbox, uidvalidity)
        return sorted({s.uid for s in errors if s.tries < max_tries})

    def abandon_errors(
        self, *, mailbox: str, uidvalidity: int, uids: Sequence[int] | None, reason: str
    ) -> int:
        chosen = [s for s in self._errors(mailbox, uidvalidity) if uids is None or s.uid in uids]
        for sighting in chosen:
            sighting.kind = SightingKind.REJECTED
            sighting.reason = f"{reason}; before: {sighting.reason or ''}"
        return len(chosen)

    def reject_exhausted_errors(self, *, mailbox: str, max_tries: int) -> int:
        chosen = [s for s in self._errors(mailbox) if s.tries >= max_tries]
        for sighting in chosen:
            sighting.kind = SightingKind.REJECTED
            sighting.reason = f"gave up after {sighting.tries} tries: {sighting.reason or ''}"
        return len(chosen)

    def known_key(self, *, sha256: str, content_key: str | None, destination: str) -> str | None:
        known = self._known(sha256, content_key, destination)
        return None if known is None else known[1]

    def add_document(
        self,
        *,
        sha256: str,
        content: bytes,
        filename: str,
        now: datetime,
        mailbox: str,
        destination: str | None,
    ) -> int:
        """A pending document due at `now` with no sighting, as `tests.documents` writes
        one straight into SQL."""
        document = _Document(
            id=max(self.documents, default=0) + 1,
            destination=destination,
            mailbox=mailbox,
            sha256=sha256,
            content_key=None,
            filename=filename,
            next_attempt_at=now,
            content=content,
        )
        self.documents[document.id] = document
        return document.id

    # --- SendQueue ---------------------------------------------------------------------

    def claim_due(
        self, *, now: datetime, limit: int, owner: str, lease_seconds: float, mailbox: str
    ) -> list[OutgoingDocument]:
        # As in SqlStore: `now` says which retries are due, `clock` which leases expired.
        leased_at = self.clock()
        due = [
            d
            for d in sorted(self.documents.values(), key=lambda d: d.id)
            if d.state is DocumentState.PENDING
            and d.mailbox == mailbox
            and d.next_attempt_at <= now
            and (d.lease_until is None or d.lease_until <= leased_at)
            and d.content is not None
        ][:limit]
        claimed: list[OutgoingDocument] = []
        for document in due:
            document.lease_until = leased_at + timedelta(seconds=lease_seconds)
            document.lease_owner = owner
            assert document.content is not None
            introducing = next(
                (
                    s.headers
                    for s in self.sightings.values()
                    if s.document_id == document.id and s.kind is SightingKind.DOCUMENT
                ),
                MailHeaders(),
            )
            claimed.append(
                OutgoingDocument(
                    document_id=document.id,
                    sha256=document.sha256,
                    content=document.content,
                    filename=document.filename or "invoice.pdf",
                    attempts=document.attempts,
                    resend_count=document.resend_count,
                    original_sender=introducing.sender,
                    original_subject=introducing.subject,
                    original_date=introducing.date,
                    original_message_id=introducing.message_id,
                    destination=document.destination,
                )
            )
        return claimed

    def mark_forwarded(
        self,
        document_id: int,
        *,
        owner: str,
        message_id: str,
        answer: str,
        now: datetime,
        keep_pdf: bool,
        via: str = "smtp",
    ) -> None:
        document = self._leased(document_id, owner, (AttemptOutcome.FORWARDED, answer, via))
        document.state = DocumentState.FORWARDED
        document.attempts += 1
        document.forwarded_message_id = message_id
        document.forwarded_at = now
        document.last_answer = answer
        if not keep_pdf:
            document.content = None

    def mark_retry(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        failed: bool,
        via: str = "smtp",
    ) -> None:
        outcome = AttemptOutcome.FAILED if failed else AttemptOutcome.RETRY
        document = self._leased(document_id, owner, (outcome, answer, via))
        document.attempts += 1
        document.last_answer = answer
        document.next_attempt_at = next_attempt_at
        if failed:
            document.state = DocumentState.FAILED

    def mark_failed(self, document_id: int, *, owner: str, answer: str, via: str = "smtp") -> None:
        document = self._leased(document_id, owner, (AttemptOutcome.FAILED, answer, via))
        document.state = DocumentState.FAILED
        document.attempts += 1
        document.last_answer = answer

    def release(
        self, document_id: int, *, owner: str, answer: str | None = None, via: str = "smtp"
    ) -> None:
        attempt = None if answer is None else (AttemptOutcome.RELEASED, answer, via)
        self._leased(document_id, owner, attempt)

    def postpone(
        self,
        document_id: int,
        *,
        owner: str,
        answer: str,
        next_attempt_at: datetime,
        via: str = "smtp",
    ) -> None:
        document = self._leased(document_id, owner, (AttemptOutcome.HELD, answer, via))
        document.last_answer = answer
        document.next_attempt_at = next_attempt_at

    # --- AdminStore --------------------------------------------------------------------

    def _narrowed(
        self, sha256: str | None, route: str | None, destination: str | None
    ) -> list[_Document]:
        """As `worker.store.admin`: the documents meant, or `DestinationAmbiguous`."""
        chosen = [d for d in self.documents.values() if sha256 in (None, d.sha256)]
        if sha256 is not None and route is None and destination is None:
            names = sorted({d.destination for d in chosen if d.destination is not None})
            if len(names) > 1:
                raise DestinationAmbiguous(sha256, tuple(names))
        if destination is not None:
            chosen = [d for d in chosen if d.destination in (None, destination)]
        if route is not None:
            chosen = [
                d
                for d in chosen
                if any(
                    s.document_id == d.id and s.kind is SightingKind.DOCUMENT and s.route == route
                    for s in self.sightings.values()
                )
            ]
        return chosen

    def requeue(
        self,
        *,
        sha256: str | None,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> int:
        chosen = [
            d for d in self._narrowed(sha256, route, destination) if d.state is DocumentState.FAILED
        ]
        for document in chosen:
            document.state = DocumentState.PENDING
            document.attempts = 0
            document.next_attempt_at = now
            document.lease_until = None
            document.lease_owner = None
        return len(chosen)

    def resend(
        self,
        *,
        sha256: str,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> bool:
        for document in self._narrowed(sha256, route, destination):
            if document.state is DocumentState.FORWARDED and document.content is not None:
                document.state = DocumentState.PENDING
                document.resend_count += 1
                document.next_attempt_at = now
                document.lease_until = None
                document.lease_owner = None
                return True
        return False

    # --- AuditReader -------------------------------------------------------------------

    def state_counts(self, mailbox: str | None = None) -> dict[DocumentState, int]:
        counts = dict.fromkeys(DocumentState, 0)
        for document in self.documents.values():
            if mailbox in (None, document.mailbox):
                counts[document.state] += 1
        return counts

    def audit(self, query: AuditFilter) -> list[AuditRow]:
        """As the `audit_log` view shows the rows, newest first."""
        rows = [self._audit_row(s) for s in self.sightings.values()]
        rows = [
            row
            for row in rows
            if (query.since is None or row.received_at >= query.since)
            and (not query.outcomes or row.outcome in query.outcomes)
            and (query.invoice_number is None or row.invoice_number == query.invoice_number)
            and (query.route is None or row.route == query.route)
        ]
        rows.sort(key=lambda row: (row.received_at, row.id), reverse=True)
        return rows if query.limit is None else rows[: query.limit]

    def _audit_row(self, sighting: _Sighting) -> AuditRow:
        # The view shows a document's state only on the sighting that introduced it.
        shown = (
            self.documents[sighting.document_id]
            if sighting.kind is SightingKind.DOCUMENT and sighting.document_id is not None
            else None
        )
        reason = sighting.reason
        if shown is not None and shown.state is DocumentState.FAILED:
            reason = shown.last_answer or sighting.reason
        part = sighting.record
        return AuditRow(
            id=sighting.id,
            received_at=sighting.received_at,
            mail_date=sighting.headers.date,
            mailbox=sighting.mailbox,
            uidvalidity=sighting.uidvalidity,
            uid=sighting.uid,
            message_id=sighting.headers.message_id,
            sender=sighting.headers.sender,
            subject=sighting.headers.subject,
            filename=part.filename,
            size_bytes=part.size_bytes,
            sha256=part.sha256,
            fingerprint=part.fingerprint,
            invoice_number=part.invoice_number,
            outcome=Outcome(shown.state.value if shown else sighting.kind.value),
            reason=reason,
            duplicate_of=sighting.duplicate_of,
            forwarded_at=shown.forwarded_at if shown else None,
            forwarded_message_id=shown.forwarded_message_id if shown else None,
            attempts=shown.attempts if shown else None,
            route=sighting.route,
            destination=(
                self.documents[sighting.document_id].destination
                if sighting.document_id is not None
                else None
            ),
        )


def _recorded(sighting: _Sighting, *, inserted: bool) -> RecordedSighting:
    return RecordedSighting(
        sighting_id=sighting.id,
        uid=sighting.uid,
        part=sighting.part,
        kind=sighting.kind,
        reason=sighting.reason,
        document_id=sighting.document_id,
        duplicate_of=sighting.duplicate_of,
        inserted=inserted,
    )


# --- after forwarding -------------------------------------------------------------------


@dataclass
class StoredMail:
    """One mail in a `FakeMailActions` folder."""

    message_id: str
    flags: set[str]


class FakeMailActions:
    """`worker.relay.ports.MailActions` over in-memory folders: {folder: {uid: mail}}.
    `log` lists the commands in order, for tests that count them."""

    def __init__(
        self,
        folders: dict[str, dict[int, StoredMail]],
        *,
        folder: str = "INBOX",
        uidvalidity: int = 1,
        capabilities: Iterable[str] = ("IMAP4REV1", "MOVE", "UIDPLUS"),
        fail_on: str | None = None,  # a command that raises MailboxError
    ) -> None:
        self.folders = folders
        self.folder = folder
        self.uidvalidity = uidvalidity
        self._capabilities = frozenset(capabilities)
        self.fail_on = fail_on
        self.log: list[str] = []
        self.opened = False

    def _run(self, command: str) -> None:
        self.log.append(command)
        if command == self.fail_on:
            raise MailboxError(f"{command} failed")

    def open_for_actions(self) -> FolderStatus:
        self._run("SELECT")
        self.opened = True
        mails = self.folders[self.folder]
        return FolderStatus(
            uidvalidity=self.uidvalidity, uidnext=max(mails, default=0) + 1, exists=len(mails)
        )

    def capabilities(self) -> frozenset[str]:
        return self._capabilities

    def folder_exists(self, folder: str) -> bool:
        self._run("LIST")
        return folder in self.folders

    def present_uids(self, uids: Sequence[int]) -> set[int]:
        self._run("SEARCH")
        return set(uids) & set(self.folders[self.folder])

    def add_flag(self, uids: Sequence[int], flag: str) -> None:
        self._run("STORE")
        for uid in uids:
            self.folders[self.folder][uid].flags.add(flag)

    def _put(self, uid: int, folder: str) -> None:
        source = self.folders[self.folder][uid]
        target = self.folders[folder]
        target[max(target, default=0) + 1] = StoredMail(
            message_id=source.message_id, flags=set(source.flags)
        )

    def move(self, uid: int, folder: str) -> None:
        self._run("MOVE")
        self._put(uid, folder)
        del self.folders[self.folder][uid]

    def copy(self, uid: int, folder: str) -> None:
        self._run("COPY")
        self._put(uid, folder)

    def expunge_uid(self, uid: int) -> None:
        self._run("UID EXPUNGE")
        del self.folders[self.folder][uid]

    def folder_holds(self, folder: str, message_id: str) -> bool:
        self._run("SEARCH TARGET")
        return any(message_id in mail.message_id for mail in self.folders[folder].values())

    def close(self) -> None:
        self.opened = False


class FakeMailActionStore:
    """`worker.relay.ports.MailActionStore` in memory: what `untidied_mails` returns is
    set by the test; recorded states land in `states` ({uid: (state, action, note)})."""

    def __init__(self, mails: Sequence[UntidiedMail]) -> None:
        self.mails = {mail.uid: mail for mail in mails}
        self.states: dict[int, tuple[str, str | None, str | None]] = {}

    def untidied_mails(self, *, mailbox: str, uidvalidity: int, limit: int) -> list[UntidiedMail]:
        del mailbox, uidvalidity
        result = []
        for uid, mail in sorted(self.mails.items()):
            state = self.states.get(uid, ("", None, None))[0]
            if state in ("", "copying"):
                result.append(
                    UntidiedMail(
                        uid=uid,
                        message_id=mail.message_id,
                        parts=mail.parts,
                        copy_started=state == "copying",
                    )
                )
        return result[:limit]

    def start_copy(self, *, mailbox: str, uidvalidity: int, uid: int, now: datetime) -> None:
        self.states.setdefault(uid, ("copying", None, None))

    def record_mail_actions(
        self,
        *,
        mailbox: str,
        uidvalidity: int,
        uids: Sequence[int],
        action: str | None,
        note: str | None = None,
        now: datetime,
    ) -> None:
        for uid in uids:
            if self.states.get(uid, ("copying",))[0] == "copying":
                self.states[uid] = ("done" if action else "skipped", action, note)


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


# --- the status page ----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class PageRow:
    """One audit row of `FakePageStore`, with the route it belongs to and its document."""

    route: str
    row: AuditRow
    state: DocumentState | None = None  # of the document it introduced, if any
    last_answer: str | None = None
    pdf: bytes | None = None
    attempts: tuple[DeliveryAttempt, ...] = ()  # its document's history
    forwarded_at: datetime | None = None
    delivered_via: str | None = None
    delivery_id: str | None = None


class FakePageStore:
    """`PageReader`, `WebSessionStore` and `AdminStore` in memory, for the views' tests.
    Rows carry routes of their own, so scoping is tested before SQL rows have routes."""

    def __init__(self) -> None:
        self.rows: dict[int, PageRow] = {}
        self.sessions: dict[str, WebSession] = {}
        self.actions: list[tuple[str, str]] = []  # (action, sha256) asked for

    def add(self, row: PageRow) -> None:
        self.rows[row.row.id] = row

    def _visible(self, scope: RouteScope) -> list[PageRow]:
        return [item for item in self.rows.values() if scope.allows(item.route)]

    def _scoped(self, item: PageRow, scope: RouteScope) -> AuditRow:
        target = item.row.duplicate_of
        if target is not None and not (
            target in self.rows and scope.allows(self.rows[target].route)
        ):
            return replace(item.row, duplicate_of=None)
        outcome = item.row.outcome
        if item.state is not None:
            outcome = Outcome(item.state.value)
        return replace(item.row, outcome=outcome)

    # --- PageReader --------------------------------------------------------------------

    def search_audit(self, search: AuditSearch) -> AuditPage:
        def wanted(item: PageRow, row: AuditRow) -> bool:
            return (
                (search.route is None or item.route == search.route)
                and (search.invoice_number is None or row.invoice_number == search.invoice_number)
                and (search.sender is None or search.sender.lower() in row.sender.lower())
                and (
                    search.filename is None
                    or search.filename.lower() in (row.filename or "").lower()
                )
                and (not search.outcomes or row.outcome in search.outcomes)
                and (search.received_from is None or row.received_at >= search.received_from)
                and (search.received_before is None or row.received_at < search.received_before)
            )

        rows = [
            row
            for item in self._visible(search.scope)
            if wanted(item, row := self._scoped(item, search.scope))
        ]
        rows.sort(key=lambda row: (row.received_at, row.id), reverse=True)
        end = None if search.limit is None else search.offset + search.limit
        return AuditPage(rows=tuple(rows[search.offset : end]), total=len(rows))

    def document_story(self, sighting_id: int, scope: RouteScope) -> DocumentStory | None:
        item = self.rows.get(sighting_id)
        if item is None or not scope.allows(item.route):
            return None
        return DocumentStory(
            row=self._scoped(item, scope),
            route=item.route,
            document_id=sighting_id if item.state is not None else None,
            state=item.state,
            last_answer=item.last_answer,
            attempt_history=item.attempts,
            forwarded_at=item.forwarded_at,
            delivered_via=item.delivered_via,
            delivery_id=item.delivery_id,
            pdf_kept=item.pdf is not None,
            sightings=(self._scoped(item, scope),),
        )

    def route_overviews(self, scope: RouteScope, now: datetime) -> list[RouteOverview]:
        routes = sorted({item.route for item in self._visible(scope)})
        return [
            RouteOverview(
                route=route,
                mailboxes=("INBOX",),
                position_moved_at=None,
                waiting=(),
                failed=tuple(
                    QueuedDocument(
                        sighting_id=item.row.id,
                        filename=item.row.filename,
                        invoice_number=item.row.invoice_number,
                        attempts=1,
                        next_attempt_at=now,
                        last_answer=item.last_answer,
                    )
                    for item in self.rows.values()
                    if item.route == route and item.state is DocumentState.FAILED
                ),
                today=dict.fromkeys(Outcome, 0),
                month=dict.fromkeys(Outcome, 0),
            )
            for route in routes
        ]

    def document_pdf(self, sighting_id: int, scope: RouteScope) -> tuple[str, bytes] | None:
        item = self.rows.get(sighting_id)
        if item is None or item.pdf is None or not scope.allows(item.route):
            return None
        return item.row.filename or "invoice.pdf", item.pdf

    # --- AdminStore --------------------------------------------------------------------

    def requeue(
        self,
        *,
        sha256: str | None,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> int:
        del route, destination  # one destination here: nothing to narrow
        self.actions.append(("retry", sha256 or "*"))
        count = 0
        for item in self.rows.values():
            if item.state is DocumentState.FAILED and sha256 in (None, item.row.sha256):
                item.state = DocumentState.PENDING
                count += 1
        return count

    def resend(
        self,
        *,
        sha256: str,
        now: datetime,
        route: str | None = None,
        destination: str | None = None,
    ) -> bool:
        del route, destination  # one destination here: nothing to narrow
        self.actions.append(("resend", sha256))
        for item in self.rows.values():
            if item.row.sha256 == sha256 and item.state is DocumentState.FORWARDED and item.pdf:
                item.state = DocumentState.PENDING
                return True
        return False

    # --- WebSessionStore ---------------------------------------------------------------

    def start_session(self, *, token_hash: str, user: str, csrf_token: str, now: datetime) -> None:
        self.sessions[token_hash] = WebSession(
            user=user, csrf_token=csrf_token, created_at=now, last_seen_at=now
        )

    def live_session(
        self, *, token_hash: str, now: datetime, idle_seconds: float
    ) -> WebSession | None:
        session = self.sessions.get(token_hash)
        if session is None:
            return None
        if (now - session.last_seen_at).total_seconds() > idle_seconds:
            del self.sessions[token_hash]
            return None
        self.sessions[token_hash] = replace(session, last_seen_at=now)
        return self.sessions[token_hash]

    def end_session(self, *, token_hash: str) -> None:
        self.sessions.pop(token_hash, None)
