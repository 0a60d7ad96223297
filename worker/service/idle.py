"""IMAP IDLE for `invoice-relay run`: poll as soon as the server announces new mail.

`IdleWatcher` keeps one connection of its own in IDLE (RFC 2177), re-issues it before
servers drop an idle client (RFC 2177 asks clients to re-issue within 29 minutes), and
reconnects with backoff when the connection drops. A session logged in with an OAuth2
token is ended and opened again shortly before that token expires (Exchange Online ends
it with `BYE ... AccessTokenExpired` otherwise). Each announcement becomes a call of
`on_new_mail`; the schedule stays the safety net. A server without IDLE is logged once
and left to the schedule.

With a `worker.service.lending.ConnectionDesk`, the watcher lends its connection to
the poll an announcement asks for, which reads the new mail on it instead of opening
one of its own, and goes back to IDLE once the poll has given it back.

`PollRequests` sits between the watcher and the service: announcements arriving while
a poll runs are folded into one more poll after it, so the service never runs two polls
at once and never loses an announcement.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.errors import MailboxError, TokenEndpointError
from worker.models import FolderStatus, PollReport
from worker.service.lending import ConnectionDesk, LoanEnd

log = logging.getLogger(__name__)


class IdleMailbox(Protocol):
    """The IDLE side of `worker.imap.mailbox.ImapMailbox`. Raises `MailboxError`, and
    `TokenEndpointError` from `open` when an OAuth2 login's token cannot be had."""

    def open(self) -> FolderStatus: ...

    def supports_idle(self) -> bool: ...

    def idle_start(self) -> None: ...

    def idle_wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s; True when new mail was announced."""

    def idle_done(self) -> bool:
        """Leave IDLE; True when new mail was announced meanwhile."""

    def token_expires_in(self) -> float | None:
        """Seconds until the OAuth2 token the session logged in with expires; None for a
        password login."""

    def close(self) -> None: ...


class IdleEnd(enum.Enum):
    STOPPED = "stopped"  # the service is stopping
    UNSUPPORTED = "unsupported"  # the server offers no IDLE: the schedule alone polls


@dataclass(frozen=True, slots=True, kw_only=True)
class IdleTiming:
    renew_seconds: float = 24 * 60.0  # re-issue IDLE well before a 29-30 min server timeout
    check_seconds: float = 1.0  # one wait on the socket: how soon a stop is noticed
    first_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0
    token_lead_seconds: float = 60.0  # an OAuth2 session is renewed this long before its end
    # Not lent to a poll when renewed sooner: a poll would lose it under its hands.
    lend_margin_seconds: float = 300.0


def renew_session_after(token_expires_in: float | None, timing: IdleTiming) -> float | None:
    """Seconds from now until a session logged in with an OAuth2 token is closed and
    opened again: `token_lead_seconds` before the token expires, or a quarter of the time
    left when that is shorter. Either way the token is then within the token source's
    refresh margin (worker.auth.cache: 5 minutes, or half of a short token's life), so
    the new session gets a fresh token, not the same one again. None: a password login,
    which only the server ends."""
    if token_expires_in is None:
        return None
    lead = min(timing.token_lead_seconds, token_expires_in / 4)
    return max(token_expires_in - lead, 0.0)


def next_backoff(previous: float, timing: IdleTiming) -> float:
    """The wait before the next reconnection: doubled, capped."""
    return min(max(previous, timing.first_backoff_seconds) * 2, timing.max_backoff_seconds)


class IdleWatcher:
    """Watches one folder with IMAP IDLE and calls `on_new_mail` for each announcement."""

    def __init__(
        self,
        *,
        mailbox: IdleMailbox,
        on_new_mail: Callable[[], None],
        stop: threading.Event,
        timing: IdleTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        desk: ConnectionDesk | None = None,  # lends this connection to the polls it asks for
    ) -> None:
        self._mailbox = mailbox
        self._desk = desk
        self._on_new_mail = on_new_mail
        self._stop = stop
        self._timing = timing or IdleTiming()
        self._clock = clock

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="invoice-relay-idle", daemon=True)
        thread.start()
        return thread

    def run(self) -> IdleEnd:
        """Watch until `stop` is set, or return at once when the server lacks IDLE."""
        delay = self._timing.first_backoff_seconds
        reconnecting = False
        uidnext: int | None = None  # at the last open: mail may come between two sessions
        while not self._stop.is_set():
            try:
                status = self._mailbox.open()
                if not self._mailbox.supports_idle():
                    log.warning(
                        "the IMAP server offers no IDLE: polling on the schedule only",
                        extra={"action": "idle_unsupported"},
                    )
                    return IdleEnd.UNSUPPORTED
                log.info("watching for new mail (IMAP IDLE)", extra={"action": "idle_watching"})
                if reconnecting or (uidnext is not None and status.uidnext != uidnext):
                    # Mail that came while the connection was down was never announced.
                    self._on_new_mail()
                uidnext, reconnecting = status.uidnext, False
                delay = self._timing.first_backoff_seconds
                renew_after = renew_session_after(self._mailbox.token_expires_in(), self._timing)
                self._watch(status, None if renew_after is None else self._clock() + renew_after)
                if not self._stop.is_set():
                    log.info(
                        "renewing the IDLE session before its OAuth2 token expires",
                        extra={"action": "idle_token_renewal"},
                    )
            except (MailboxError, TokenEndpointError) as exc:  # no token yet is an outage too
                log.warning(
                    "IDLE connection lost, reconnecting in %.0f s: %s",
                    delay,
                    exc,
                    extra={"action": "idle_reconnecting"},
                )
                reconnecting = True
                if self._stop.wait(delay):
                    break
                delay = next_backoff(delay, self._timing)
            except Exception:  # a bug must not end the watcher unseen; logged, retried
                log.exception(
                    "IDLE watcher failed, restarting in %.0f s",
                    delay,
                    extra={"action": "idle_failed"},
                )
                reconnecting = True
                if self._stop.wait(delay):
                    break
                delay = next_backoff(delay, self._timing)
            finally:
                self._mailbox.close()
        return IdleEnd.STOPPED

    def _watch(self, status: FolderStatus, session_ends: float | None) -> None:
        """IDLE until `stop`, or until `session_ends` (on the watcher's clock): then the
        caller opens a new session, with a fresh token."""
        timing = self._timing
        while not self._stop.is_set():
            if session_ends is not None and self._clock() >= session_ends:
                return
            self._mailbox.idle_start()
            renew_at = self._clock() + timing.renew_seconds
            if session_ends is not None:
                renew_at = min(renew_at, session_ends)
            announced = False
            while not announced and not self._stop.is_set():
                left = renew_at - self._clock()
                if left <= 0:
                    break
                announced = self._mailbox.idle_wait(min(timing.check_seconds, left))
            # DONE also collects what the server said after the last wait.
            announced = self._mailbox.idle_done() or announced
            if announced and not self._stop.is_set():
                log.debug("new mail announced", extra={"action": "idle_new_mail"})
                lendable = session_ends is None or (
                    session_ends - self._clock() > timing.lend_margin_seconds
                )
                if self._desk is None or not lendable:
                    self._on_new_mail()
                else:
                    self._lend(self._desk, status)

    def _lend(self, desk: ConnectionDesk, status: FolderStatus) -> None:
        """The connection to the poll asked for, until it is back with nothing new."""
        while not self._stop.is_set():
            end = desk.lend(status, ask=self._on_new_mail, stop=self._stop)
            if end is LoanEnd.SPOILED:
                raise MailboxError("the poll that read on the IDLE connection failed with it")
            if end is not LoanEnd.MAIL_CAME:
                return
            log.debug(
                "mail announced while a poll read on the IDLE connection: polling again",
                extra={"action": "idle_new_mail"},
            )


class PollRequests:
    """Runs the service's polls (`poll`) and turns announcements into more of them.

    `ask` makes the service run its poll job (the Service's `poll_now`, which runs a
    request made while the job is still winding down as soon as it has ended). An
    announcement during a poll is kept and asked for once that poll is over: it may
    have come after the poll looked.
    """

    def __init__(
        self, poll: Callable[[], PollReport], *, desk: ConnectionDesk | None = None
    ) -> None:
        self._poll = poll
        self._desk = desk  # told when a poll starts and ends (`ConnectionDesk.poll_ended`)
        self._ask: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._running = False
        self._wanted = False

    def connect(self, ask: Callable[[], None]) -> None:
        self._ask = ask

    def poll(self) -> PollReport:
        with self._lock:
            self._running, self._wanted = True, False
        ticket = self._desk.poll_started() if self._desk is not None else 0
        try:
            return self._poll()
        finally:
            if self._desk is not None:
                self._desk.poll_ended(ticket)
            with self._lock:
                self._running = False
                again, self._wanted = self._wanted, False
            if again:
                self._request()

    def new_mail(self) -> None:
        """The watcher's `on_new_mail`."""
        with self._lock:
            if self._running:
                self._wanted = True
                return
        self._request()

    def _request(self) -> None:
        if self._ask is not None:
            self._ask()
