"""An SMTP session kept open between polls for `invoice-relay run`.

With IDLE a mail is forwarded within a second of its arrival, and a new session costs
connecting, the greeting and EHLO (with STARTTLS and a login, four more round trips)
before the mail's own round trip. `WarmSmtpOutbox` is an `SmtpOutbox` whose `close`
keeps the session (it is *parked*) and whose `open` reuses a parked one after a `NOOP`
(RFC 5321 §4.1.1.9) has come back `250`; a session the server dropped meanwhile (no
answer, or `421`) is opened anew, as a first one would be. A parked session is closed
with QUIT after `keep_seconds` (60 s by default, a fifth of the five minutes RFC 5321
§4.5.3.2.7 gives servers, under which Postfix, Exim and the large providers stay),
and by `shut` at the end of the service.

`prepare` runs that check ahead, in a thread of its own, while the poll still reads the
mail: the first send then finds the session checked.
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.delivery.smtp import SmtpOutbox

__all__ = ["KEEP_SECONDS", "WarmSmtpOutbox"]

logger = logging.getLogger(__name__)

KEEP_SECONDS = 60.0
# A check this recent stands for the NOOP of `open`: the one `prepare` sent for the poll
# that is about to send.
FRESH_SECONDS = 5.0


class WarmSmtpOutbox(SmtpOutbox):
    """`SmtpOutbox` that keeps its session between uses. One user at a time (the
    service runs one poll at a time); the timer that ends a parked session and the
    check of `prepare` take the lock that `open` and `close` take."""

    def __init__(
        self,
        *,
        keep_seconds: float = KEEP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        if keep_seconds <= 0:
            raise ValueError("keep_seconds must be positive")
        super().__init__(**options)
        self._keep_seconds = keep_seconds
        self._clock = clock
        self._lock = threading.RLock()  # `SmtpOutbox.open` calls `close`
        self._parked: int | None = None  # the number of the park the session is in
        self._parks = 0
        self._checked_at: float | None = None  # the last NOOP that came back 250
        self._checking: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.reused = 0  # sessions taken up again after a NOOP, for tests and the bench
        self.reopened = 0  # parked sessions found dropped and opened anew

    def open(self) -> None:
        """Reuse the parked session when its NOOP comes back 250, else connect, TLS and
        log in (`SmtpOutbox.open`). Raises `SessionRefused`."""
        self._join_check()
        with self._lock:
            self._cancel_timer()
            parked, self._parked = self._parked, None
            if parked is not None and self._alive():
                self.reused += 1
                logger.info(
                    "smtp session reused after a NOOP",
                    extra={"action": "smtp_reused", "host": self._host, "port": self._port},
                )
                return
            if parked is not None:
                self.reopened += 1
                logger.info(
                    "the kept smtp session was dropped by the server: opening a new one",
                    extra={"action": "smtp_reopened", "host": self._host, "port": self._port},
                )
            SmtpOutbox.close(self)  # a session opened again while in use: QUIT, not parked
            super().open()

    def close(self) -> None:
        """Park the session (QUIT comes after `keep_seconds` unused, or with `shut`);
        an envelope written ahead for a mail that did not follow is reset first."""
        with self._lock:
            if not self.is_open:
                self._parked = None
                return
            if self._ahead is not None:
                self._reset_or_drop(unread=2)  # its MAIL and RCPT answers, then RSET
                if not self.is_open:
                    return
            self._parks += 1
            self._parked = self._parks
            self._cancel_timer()
            timer = threading.Timer(self._keep_seconds, self._expire, args=(self._parks,))
            timer.daemon = True
            timer.name = "smtp-keep"
            self._timer = timer
            timer.start()

    def prepare(self) -> None:
        """Check a parked session now, in a thread, while the caller does other work;
        nothing when no session is parked."""
        with self._lock:
            if self._parked is None or self._checking is not None:
                return
            thread = threading.Thread(target=self._check, name="smtp-check", daemon=True)
            self._checking = thread
            thread.start()

    def shut(self) -> None:
        """QUIT a parked session: the service ends. A session in use is left alone (its
        poll outlived the shutdown; the process exit closes the socket)."""
        self._join_check()
        with self._lock:
            self._cancel_timer()
            if self._parked is not None:
                self._parked = None
                SmtpOutbox.close(self)

    # --- inside ------------------------------------------------------------------------

    def _check(self) -> None:
        with self._lock:
            try:
                if self._parked is not None:
                    self._noop()  # a session that failed it is dropped: `open` connects anew
            finally:
                self._checking = None

    def _join_check(self) -> None:
        with self._lock:
            checking, self._checking = self._checking, None
        if checking is not None:
            checking.join()

    def _alive(self) -> bool:
        checked = self._checked_at
        if checked is not None and self._clock() - checked <= FRESH_SECONDS and self.is_open:
            self._checked_at = None  # one send per check
            return True
        return self._noop()

    def _noop(self) -> bool:
        """NOOP on the parked session: True for a 250; any other answer, or none, drops it."""
        smtp = self._smtp
        if smtp is None:
            return False
        self.round_trips += 1
        try:
            code, _ = smtp.noop()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code == 250:
            self._checked_at = self._clock()
            return True
        self._checked_at = None
        self._drop()
        return False

    def _expire(self, park: int) -> None:
        with self._lock:
            if self._parked != park:
                return  # taken up again (or parked anew) since this timer was set
            self._parked = None
            self._timer = None
            logger.debug(
                "kept smtp session closed after %.0f s unused",
                self._keep_seconds,
                extra={"action": "smtp_idle_closed", "host": self._host, "port": self._port},
            )
            SmtpOutbox.close(self)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
