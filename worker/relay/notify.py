"""Failure notices: after a poll, one short summary mail to INVOICE_RELAY_NOTIFY_TO about
a route's documents that `failed` and sightings `rejected` or in `error` that nobody was
told of.

And a login notice when a poll could not log in because the mailbox's OAuth2 grant or
client was refused, sent only where the notice's own transport does not hang on that
credential (SMTP with a password): otherwise `check`, `/healthz` and the status page say it.

A notice covers one mailbox folder's rows and names its route. At most one notice per
mailbox per INVOICE_RELAY_NOTIFY_INTERVAL, never about the same rows twice (what was
notified is kept per row in the database, `worker.store.notices`), and one process at a
time sends a mailbox's notice: replicas finishing their polls at once send one notice,
the database deciding which (a lease, like a poll's). The mail carries no PDF
and no mail body: audit ids, outcomes, file names and reasons only. Its mail
(`worker.delivery.message.notice_message`) is `Auto-Submitted` and carries
`X-Invoice-Relay-Notice`, which the loop guard
(`worker.mail.verdicts.loop_reason`) rejects should a notice land in the polled mailbox.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from worker.errors import RelayError
from worker.mail.text import clean_text
from worker.models import DEFAULT_LEASE_SECONDS, Notice, NoticeMark, Problem, ProblemKind

log = logging.getLogger(__name__)

LISTED_LIMIT = 50  # rows spelled out in one mail; the rest are counted
FETCH_LIMIT = 1000  # rows one notice covers; more wait for the next notice
REASON_LIMIT = 200
FILENAME_LIMIT = 80
ROUTE_LIMIT = 60
AUDIT_HINT = "invoice-relay audit --outcome failed --outcome rejected --outcome error"


class NoticeLog(Protocol):
    """What the notifier asks the database (`worker.store.notices.SqlNoticeLog`)."""

    def take(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool:
        """The mailbox's notice lease for `owner`; False while another owner holds it."""

    def still_holds(self, mailbox: str, *, owner: str, lease_seconds: float) -> bool: ...

    def release(self, mailbox: str, *, owner: str) -> None: ...

    def last_notice(self, mailbox: str) -> NoticeMark | None: ...

    def unnotified(self, mailbox: str, *, limit: int) -> list[Problem]: ...

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
        """What the sent notice covered; hands the lease back."""


class NoticeSender(Protocol):
    """A session that sends notices (`worker.delivery.smtp.SmtpOutbox`, which writes
    the mail with `worker.delivery.message.notice_message`). Raises
    `DeliveryUnavailable` or `DeliveryRefused`."""

    def open(self) -> None: ...

    def send_notice(self, notice: Notice) -> str:
        """Send one notice; returns the server's answer."""

    def close(self) -> None: ...


class NoticeResult(enum.Enum):
    BUSY = "busy"  # another process is sending this mailbox's notice (or took it over)
    NOT_DUE = "not_due"  # the last notice is more recent than the interval
    NOTHING_NEW = "nothing_new"  # no unnotified problem rows
    SENT = "sent"  # one notice went out and was recorded
    FAILED = "failed"  # sending or recording failed; logged, tried again after a later poll


# --- pure decisions ----------------------------------------------------------------------


def notice_due(last: NoticeMark | None, *, now: datetime, interval_seconds: float) -> bool:
    """Whether a notice may go out now: none yet, or the last one is old enough."""
    if last is None:
        return True
    return (now - last.sent_at).total_seconds() >= interval_seconds


def covered_sighting_id(problems: Sequence[Problem], previous: int) -> int:
    """The highest rejected/error sighting a notice covers, never below the previous
    one (kept in `notifications.last_sighting_id`; what was notified is kept per row)."""
    ids = [p.audit_id for p in problems if p.kind is not ProblemKind.FAILED]
    return max([previous, *ids])


def notice_subject(problems: Sequence[Problem], *, route: str = "default") -> str:
    counts = _counts(problems)
    parts = [f"{count} {kind.value}" for kind, count in counts.items() if count]
    name = clean_text(route, ROUTE_LIMIT)
    return f"invoice-relay ({name}): {', '.join(parts)} - please have a look"


def build_notice(
    problems: Sequence[Problem],
    *,
    notify_from: str,
    notify_to: str,
    mailbox: str,
    now: datetime,
    interval_seconds: float,
    route: str = "default",
) -> Notice:
    """The summary: counts, then one line per row (at most LISTED_LIMIT)."""
    if not problems:
        raise ValueError("a notice needs at least one problem")
    return Notice(
        sender=notify_from,
        recipient=notify_to,
        subject=notice_subject(problems, route=route),
        body=_body(problems, route=route, mailbox=mailbox, interval_seconds=interval_seconds),
        rows=len(problems),
        written_at=now,
    )


def build_login_notice(
    reason: str,
    *,
    notify_from: str,
    notify_to: str,
    mailbox: str,
    now: datetime,
    interval_seconds: float,
) -> Notice:
    """The mail saying the relay cannot log in to `mailbox` and what to do (`reason`,
    an error's text, which names the fix and never a token)."""
    where = clean_text(mailbox, 200)
    body = (
        f"invoice-relay cannot log in to {where}, so it reads no new invoices until a "
        "person acts:\n\n"
        f"  {clean_text(reason, 2 * REASON_LIMIT)}\n\n"
        "Nothing is lost: the mail stays in the mailbox and is read once the login works.\n"
        f"While this lasts, this notice comes at most once per {interval_seconds:g} s.\n"
    )
    return Notice(
        sender=notify_from,
        recipient=notify_to,
        subject=f"invoice-relay: cannot log in to {clean_text(mailbox, 80)} - please act",
        body=body,
        rows=0,
        written_at=now,
    )


def _counts(problems: Sequence[Problem]) -> dict[ProblemKind, int]:
    counts = dict.fromkeys(ProblemKind, 0)
    for problem in problems:
        counts[problem.kind] += 1
    return counts


_KIND_HELP = {
    ProblemKind.FAILED: "not forwarded; `invoice-relay retry SHA256` queues one again",
    ProblemKind.REJECTED: "not accepted by a rule (not a PDF, sender, size, loop)",
    ProblemKind.ERROR: "a check crashed or timed out; retried on later polls",
}


def _body(problems: Sequence[Problem], *, route: str, mailbox: str, interval_seconds: float) -> str:
    name = clean_text(route, ROUTE_LIMIT)
    where = clean_text(mailbox, 200)
    lines = [
        f"invoice-relay found rows in its audit log that need a person (route {name}, {where}).",
        "",
    ]
    for kind, count in _counts(problems).items():
        if count:
            lines.append(f"  {kind.value:<9} {count:>5}   {_KIND_HELP[kind]}")
    lines += ["", "audit id  outcome    file / reason"]
    for problem in problems[:LISTED_LIMIT]:
        filename = clean_text(problem.filename or "", FILENAME_LIMIT) or "-"
        reason = clean_text(problem.reason, REASON_LIMIT) or "-"
        lines.append(f"{problem.audit_id:>8}  {problem.kind.value:<9}  {filename}: {reason}")
    if len(problems) > LISTED_LIMIT:
        lines.append(f"... and {len(problems) - LISTED_LIMIT} more")
    lines += [
        "",
        f"All of them: {AUDIT_HINT}",
        "These rows are not reported again; at most one notice per"
        f" {interval_seconds:g} s for this mailbox.",
    ]
    return "\n".join(lines) + "\n"


# --- the notifier --------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Notifier:
    """Sends at most one notice after a poll; `after_poll` never raises a RelayError.

    `owner` is the process run's lease token (`worker.relay.lease.new_owner`): its
    heartbeat renews the notice lease while a slow server takes the notice, and its
    leases expire when it dies, so another process sends what it did not record."""

    def __init__(
        self,
        *,
        log: NoticeLog,
        sender: Callable[[], NoticeSender],
        notify_to: str,
        notify_from: str,
        mailbox: str,
        owner: str,
        interval_seconds: float,
        route: str = "default",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._log = log
        self._sender = sender
        self._notify_to = notify_to
        self._notify_from = notify_from
        self._mailbox = mailbox
        self._owner = owner
        self._interval = interval_seconds
        self._route = route
        self._lease_seconds = lease_seconds
        self._clock = clock

    def after_poll(self) -> NoticeResult:
        try:
            return self._notify()
        except RelayError as exc:
            # The poll's own work is done and recorded: a notice problem must not undo that.
            log.warning(
                "failure notice not sent: %s",
                exc,
                extra={"action": "notice_failed", "route": self._route},
            )
            return NoticeResult.FAILED

    def after_login_failure(self, reason: str) -> NoticeResult:
        """A login notice (`build_login_notice`) when one is due; never raises a RelayError.
        It counts as a notice for the interval, and covers no rows. Under the mailbox's
        notice lease, like a failure notice: replicas failing at once send one."""
        try:
            if not self._log.take(
                self._mailbox, owner=self._owner, lease_seconds=self._lease_seconds
            ):
                return NoticeResult.BUSY
            try:
                return self._login_notice(reason)
            finally:
                self._log.release(self._mailbox, owner=self._owner)
        except RelayError as exc:
            log.warning(
                "login notice not sent: %s",
                exc,
                extra={"action": "notice_failed", "route": self._route},
            )
            return NoticeResult.FAILED

    def _login_notice(self, reason: str) -> NoticeResult:
        now = self._clock()
        last = self._log.last_notice(self._mailbox)
        if not notice_due(last, now=now, interval_seconds=self._interval):
            return NoticeResult.NOT_DUE
        notice = build_login_notice(
            reason,
            notify_from=self._notify_from,
            notify_to=self._notify_to,
            mailbox=self._mailbox,
            now=now,
            interval_seconds=self._interval,
        )
        self._send(notice)
        self._log.record(
            mailbox=self._mailbox,
            owner=self._owner,
            sent_at=now,
            recipient=self._notify_to,
            last_sighting_id=last.last_sighting_id if last is not None else 0,
            problems=(),
        )
        log.info(
            "login failure notice sent",
            extra={"action": "login_notice_sent", "route": self._route},
        )
        return NoticeResult.SENT

    def _send(self, notice: Notice) -> None:
        sender = self._sender()
        try:
            sender.open()
            sender.send_notice(notice)
        finally:
            sender.close()

    def _notify(self) -> NoticeResult:
        # Decided in the database before anything is read: of replicas finishing polls
        # at once, one sends; the others find the lease taken, or (once it is handed
        # back) the notice sent and its rows recorded.
        if not self._log.take(self._mailbox, owner=self._owner, lease_seconds=self._lease_seconds):
            return NoticeResult.BUSY
        try:
            return self._notify_holding()
        finally:
            self._log.release(self._mailbox, owner=self._owner)

    def _notify_holding(self) -> NoticeResult:
        now = self._clock()
        last = self._log.last_notice(self._mailbox)
        if not notice_due(last, now=now, interval_seconds=self._interval):
            return NoticeResult.NOT_DUE
        problems = self._log.unnotified(self._mailbox, limit=FETCH_LIMIT)
        if not problems:
            return NoticeResult.NOTHING_NEW
        notice = build_notice(
            problems,
            notify_from=self._notify_from,
            notify_to=self._notify_to,
            mailbox=self._mailbox,
            now=now,
            interval_seconds=self._interval,
            route=self._route,
        )
        sender = self._sender()
        try:
            sender.open()
            # A process frozen past its lease finds it taken over: the other one sends.
            if not self._log.still_holds(
                self._mailbox, owner=self._owner, lease_seconds=self._lease_seconds
            ):
                log.warning(
                    "failure notice left to the process that took it over",
                    extra={"action": "lease_lost", "route": self._route},
                )
                return NoticeResult.BUSY
            sender.send_notice(notice)
        finally:
            sender.close()
        # Recorded after the server accepted it: a crash in between repeats one notice
        # rather than losing it.
        self._log.record(
            mailbox=self._mailbox,
            owner=self._owner,
            sent_at=now,
            recipient=self._notify_to,
            last_sighting_id=covered_sighting_id(
                problems, last.last_sighting_id if last is not None else 0
            ),
            problems=problems,
        )
        log.info(
            "failure notice sent about %d row(s)",
            len(problems),
            extra={"action": "notice_sent", "route": self._route},
        )
        return NoticeResult.SENT
