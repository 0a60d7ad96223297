"""What `run` keeps from one poll to the next, so that a mail announced by IDLE is read
and sent without new sessions: the SMTP session, kept warm (`worker.delivery.warm`),
and the IDLE watcher's connection, lent to the poll it asks for
(`worker.service.lending`). `once` keeps nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.cli.wiring import Logins, imap_mailbox, password_logins
from worker.config.settings import Settings
from worker.delivery.warm import WarmSmtpOutbox
from worker.imap.mailbox import ImapMailbox
from worker.models import DeliveryKind
from worker.service.idle import IdleWatcher
from worker.service.lending import ConnectionDesk, LentMailbox


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptSessions:
    outbox: WarmSmtpOutbox | None  # None: delivery by the API, which has no session
    idle_mailbox: ImapMailbox | None  # the watcher's connection; None without IDLE
    desk: ConnectionDesk | None

    def lent_mailbox(self) -> LentMailbox | None:
        """The watcher's connection when it is on offer (a poll it asked for), with the
        kept SMTP session checked meanwhile; else None: the poll opens its own."""
        lent = self.desk.take() if self.desk is not None else None
        if lent is not None and self.outbox is not None:
            self.outbox.prepare()  # the NOOP goes out while the mail is read
        return lent

    def watch(self, on_new_mail: Callable[[], None], stop: threading.Event) -> None:
        """Start the IDLE watcher (a daemon thread) on the kept connection."""
        if self.idle_mailbox is None:
            raise ValueError("no IDLE connection is kept (INVOICE_RELAY_IDLE is off)")
        IdleWatcher(
            mailbox=self.idle_mailbox, on_new_mail=on_new_mail, stop=stop, desk=self.desk
        ).start()


@contextmanager
def kept_sessions(settings: Settings, logins: Logins | None = None) -> Iterator[KeptSessions]:
    """The sessions `run` keeps; the SMTP one is QUIT when the service ends."""
    made = logins or password_logins(settings)
    outbox = None
    if settings.delivery is DeliveryKind.SMTP:
        outbox = WarmSmtpOutbox(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            credentials=made.smtp,
            forward_from=settings.forward_from,
            forward_to=settings.forward_to,
            ca_file=settings.ca_file,
            timeout=settings.timeout_seconds,
        )
    mailbox = imap_mailbox(settings, made, for_idle=True) if settings.idle else None
    desk = (
        ConnectionDesk(mailbox, deadline_seconds=settings.poll_deadline_seconds)
        if mailbox is not None
        else None
    )
    try:
        yield KeptSessions(outbox=outbox, idle_mailbox=mailbox, desk=desk)
    finally:
        if outbox is not None:
            outbox.shut()
