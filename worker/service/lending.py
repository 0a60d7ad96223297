"""The IDLE connection lent to the poll that its announcement asked for.

A poll on a connection of its own first connects, logs in and EXAMINEs the folder, and
logs out before it sends: four round trips (more with TLS) between an announcement and
the forwarded mail. The watcher's connection has just left IDLE, logged in, with the
folder open. So on an announcement the watcher offers it at a `ConnectionDesk`, asks
for a poll and waits; the poll takes it (`take`) as its mailbox, reads through the same
pipeline as ever (under its poll lease, recorded, deduplicated and claimed as any other
poll), and gives it back when it stops reading (`LentMailbox.close`), before it sends;
then the watcher goes back to IDLE.

imapclient is not thread-safe, and need not be here: the connection is used by one
thread at a time, and the desk's lock orders the hand-overs. The watcher does nothing
with it while it is out; a `LentMailbox` refuses every call once given back.

What the server announces while the poll has the connection comes with the answers to
the poll's commands, after the poll may have looked: `end_loan` says whether any came,
and the watcher then offers the connection again for one more poll. A poll that fails
with it gives it back spoiled: the watcher opens a new connection, as after a drop.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Protocol

from worker.errors import MailboxError
from worker.models import FolderStatus, MailSummary

log = logging.getLogger(__name__)

# How long an offer waits for a poll to take it, when nothing withdraws it first (a
# poll that started after the offer and ended without it withdraws it at once).
OFFER_SECONDS = 60.0


class LendableMailbox(Protocol):
    """What a poll does with the watcher's connection (`worker.imap.mailbox.ImapMailbox`)."""

    def begin_loan(self, deadline_seconds: float | None) -> None: ...

    def end_loan(self) -> bool:
        """Stop the poll's deadline; True when mail was announced during the loan."""

    def new_uids(self, after_uid: int, since: date | None) -> list[int]: ...

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]: ...

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]: ...

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None: ...

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]: ...


class LoanEnd(enum.Enum):
    BACK = "back"  # given back; nothing announced meanwhile: back to IDLE
    MAIL_CAME = "mail_came"  # given back; mail was announced meanwhile: one more poll
    SPOILED = "spoiled"  # given back by a poll that failed with it: open a new connection
    NOT_TAKEN = "not_taken"  # no poll took it (none came, or the service stops)


@dataclass(slots=True, kw_only=True)
class _Loan:
    ticket: int  # offers made so far, this one included
    status: FolderStatus  # of the watcher's EXAMINE
    taken: bool = False
    withdrawn: bool = False
    end: LoanEnd | None = None  # set when given back


class ConnectionDesk:
    """Where the IDLE watcher's connection waits for a poll, and comes back from it."""

    def __init__(
        self,
        mailbox: LendableMailbox,
        *,
        deadline_seconds: float | None,
        offer_seconds: float = OFFER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mailbox = mailbox
        self._deadline_seconds = deadline_seconds  # INVOICE_RELAY_POLL_DEADLINE, per loan
        self._offer_seconds = offer_seconds
        self._clock = clock
        self._changed = threading.Condition()
        self._loan: _Loan | None = None
        self._offers = 0
        self.lent = 0  # loans a poll took, for tests and the bench

    # --- the watcher ---------------------------------------------------------------------

    def lend(
        self, status: FolderStatus, *, ask: Callable[[], None], stop: threading.Event
    ) -> LoanEnd:
        """Offer the connection (out of IDLE, folder `status` open), `ask` for a poll,
        and wait until it is given back or the offer lapses. While a poll has it, this
        waits for it even when `stop` is set: the connection is the poll's then."""
        with self._changed:
            self._offers += 1
            loan = self._loan = _Loan(ticket=self._offers, status=status)
        ask()
        lapses = self._clock() + self._offer_seconds
        with self._changed:
            try:
                while loan.end is None:
                    if not loan.taken and (
                        loan.withdrawn or stop.is_set() or self._clock() >= lapses
                    ):
                        loan.withdrawn = True
                        return LoanEnd.NOT_TAKEN
                    self._changed.wait(0.25)  # `stop` has no way to wake this condition
                return loan.end
            finally:
                self._loan = None

    # --- the polls -------------------------------------------------------------------------

    def poll_started(self) -> int:
        """A poll begins: its ticket for `poll_ended`."""
        with self._changed:
            return self._offers

    def poll_ended(self, ticket: int) -> None:
        """A poll ended. An offer made before it began that it did not take is
        withdrawn: the poll it asked for has come and gone (locked out by another
        replica, or failed before reading)."""
        with self._changed:
            loan = self._loan
            if loan is not None and not loan.taken and loan.ticket <= ticket:
                loan.withdrawn = True
                self._changed.notify_all()

    def take(self) -> LentMailbox | None:
        """The offered connection as the poll's mailbox, or None (nothing on offer)."""
        with self._changed:
            loan = self._loan
            if loan is None or loan.taken or loan.withdrawn:
                return None
            loan.taken = True
        try:
            self._mailbox.begin_loan(self._deadline_seconds)
        except MailboxError:
            self._give_back(loan, spoiled=True)
            return None
        self.lent += 1
        log.info("reading on the IDLE connection", extra={"action": "idle_connection_lent"})
        return LentMailbox(
            self._mailbox,
            loan.status,
            give_back=lambda spoiled: self._give_back(loan, spoiled=spoiled),
        )

    def _give_back(self, loan: _Loan, *, spoiled: bool) -> None:
        mail_came = self._mailbox.end_loan()
        with self._changed:
            if spoiled:
                loan.end = LoanEnd.SPOILED
            else:
                loan.end = LoanEnd.MAIL_CAME if mail_came else LoanEnd.BACK
            self._changed.notify_all()


class LentMailbox:
    """`worker.relay.ports.Mailbox` (and `worker.mail.ranged.RangedFetch`) over the
    watcher's connection, for one poll. Every call after `close` raises MailboxError."""

    def __init__(
        self,
        mailbox: LendableMailbox,
        status: FolderStatus,
        *,
        give_back: Callable[[bool], None],
    ) -> None:
        self._mailbox = mailbox
        self._status = status
        self._give_back = give_back
        self._closed = False
        self._spoiled = False

    def open(self) -> FolderStatus:
        """The folder as the watcher's EXAMINE found it, without a round trip.
        UIDVALIDITY cannot change while a folder is selected (a server that renumbers
        ends the session); UIDNEXT 0 means "not known": the poll then lists the UIDs
        past its position, as it does for a server that leaves UIDNEXT out."""
        with self._using():
            return FolderStatus(
                uidvalidity=self._status.uidvalidity, uidnext=0, exists=self._status.exists
            )

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        with self._using():
            return self._mailbox.new_uids(after_uid, since)

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        with self._using():
            return self._mailbox.summaries(uids)

    def fetch_sections(
        self, wanted: Mapping[int, Sequence[str]], *, max_bytes: int | None = None
    ) -> dict[tuple[int, str], bytes]:
        with self._using():
            return self._mailbox.fetch_sections(wanted, max_bytes=max_bytes)

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        with self._using():
            return self._mailbox.fetch_range(uid, section, offset=offset, length=length)

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        with self._using():
            return self._mailbox.fetch_messages(uids)

    def close(self) -> None:
        """Give the connection back to the watcher; never raises, and only once."""
        if self._closed:
            return
        self._closed = True
        self._give_back(self._spoiled)

    @contextmanager
    def _using(self) -> Iterator[None]:
        if self._closed:
            raise MailboxError("the IDLE connection lent to this poll was given back")
        try:
            yield
        except MailboxError:
            self._spoiled = True  # whatever state the session is in, it is not the watcher's
            raise
