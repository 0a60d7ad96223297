"""Values of the polled mailbox: what IMAP tells of a mail, how an adapter logs in, and
what happens to a settled mail (INVOICE_RELAY_AFTER_FORWARD). Pure: no I/O."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from worker.tokens import TokenCredentials


class Security(enum.Enum):
    SSL = "ssl"  # TLS from the first byte (IMAPS 993, SMTPS 465)
    STARTTLS = "starttls"  # plain connect, then upgrade before login
    NONE = "none"  # no TLS at all: loopback and tests only


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderStatus:
    """What SELECT/EXAMINE tells about the polled folder."""

    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyPart:
    """One node of a mail's MIME tree, as the IMAP server's BODYSTRUCTURE describes it.

    `section` is the IMAP part specifier ("1", "2.1", ...); the root of a multipart
    mail has section "" (it cannot be fetched as a part).
    """

    section: str
    content_type: str  # lower case "type/subtype"
    params: Mapping[str, str] = field(default_factory=dict)  # keys lower case, values raw
    disposition: str | None = None  # lower case "attachment" / "inline"
    disposition_params: Mapping[str, str] = field(default_factory=dict)
    encoding: str = "7bit"  # lower case Content-Transfer-Encoding
    size: int = 0  # encoded size in octets
    children: tuple[BodyPart, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A part that is, or may be, a PDF.

    `certain` is True when the label says PDF (name ends in .pdf or type is
    application/pdf); otherwise the first bytes must be probed for `%PDF-`.
    """

    section: str
    filename: str | None
    content_type: str
    encoding: str
    size: int
    certain: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MailHeaders:
    """The few headers of an incoming mail the relay reads; text already decoded."""

    message_id: str = ""
    sender: str = ""  # the From header as display text
    sender_address: str = ""  # the single address in From, lower case; "" when unparseable
    sender_defect: str | None = None  # why From could not be trusted, when it cannot
    subject: str = ""
    date: datetime | None = None
    auto_submitted: str | None = None
    relay_marker: str | None = None  # our own X-Invoice-Relay header, when present
    notice_marker: str | None = None  # our X-Invoice-Relay-Notice header (failure notices)
    authentication_results: tuple[str, ...] = ()  # raw values, top (newest) first


@dataclass(frozen=True, slots=True, kw_only=True)
class MailSummary:
    """What one FETCH of BODYSTRUCTURE, size, internal date and headers yields for a mail."""

    uid: int
    size: int
    internaldate: datetime | None
    headers: MailHeaders
    structure: BodyPart | None  # None when the server could not describe it
    structure_problem: str | None = None  # why the structure could not be read


@dataclass(frozen=True, slots=True, kw_only=True)
class PdfReport:
    """What inspecting one file found. `accepted` False means `reason` says why not."""

    accepted: bool
    reason: str | None = None
    encrypted: bool = False
    pages: int = 0
    fingerprint: str | None = None  # "fp1:<hex>" or None when it could not be computed
    fingerprint_note: str | None = None  # why there is no fingerprint
    invoice_number: str | None = None  # the first the pattern read
    # The first pages read as several different invoice numbers: `invoice_number` is
    # only the first of them, and is not filed as the document's number.
    invoice_number_ambiguous: bool = False
    # INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN matched the first pages' text (when checked).
    credit_note: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxPosition:
    """How far the relay got in one mailbox: every UID <= last_uid is recorded."""

    mailbox: str
    uidvalidity: int
    last_uid: int


class SecretText(Protocol):
    """A secret string that prints masked (`worker.config.environment.Secret`)."""

    def reveal(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordCredentials:
    """A user name and password, for IMAP LOGIN / AUTHENTICATE PLAIN and SMTP AUTH."""

    user: str
    password: SecretText

    def __repr__(self) -> str:
        return f"PasswordCredentials(user={self.user!r}, password='****')"


# What an adapter logs in with: a password, or an OAuth2 token source (SASL XOAUTH2 /
# OAUTHBEARER, worker.mail.sasl). Each adapter's `match` says how it carries each kind.
Credentials = PasswordCredentials | TokenCredentials


# --- after forwarding: what happens to the mail (INVOICE_RELAY_AFTER_FORWARD) ----------


class MailActionMode(enum.Enum):
    KEEP = "keep"  # the folder is only EXAMINEd: nothing about the mail changes
    SEEN = "seen"  # a settled mail gets the \\Seen flag
    FLAG = "flag"  # a settled mail gets the \\Flagged flag
    MOVE = "move"  # a settled mail is moved to another folder


@dataclass(frozen=True, slots=True, kw_only=True)
class AfterForward:
    """What to do with a settled mail that carried an accepted PDF."""

    mode: MailActionMode = MailActionMode.KEEP
    folder: str | None = None  # the target of MOVE; set exactly then

    def __post_init__(self) -> None:
        if (self.mode is MailActionMode.MOVE) != bool(self.folder):
            raise ValueError("a folder is needed for move, and only for move")

    def __str__(self) -> str:
        """The setting's own spelling: `keep`, `seen`, `flag` or `move:FOLDER`."""
        if self.mode is MailActionMode.MOVE:
            return f"move:{self.folder}"
        return str(self.mode.value)

    @property
    def changes_mailbox(self) -> bool:
        return self.mode is not MailActionMode.KEEP

    @property
    def done_text(self) -> str:
        """What `audit_log.mail_action` says once the action was taken."""
        if self.mode is MailActionMode.MOVE:
            return f"moved to {self.folder}"
        return {MailActionMode.SEEN: "seen", MailActionMode.FLAG: "flagged"}.get(self.mode, "")
