"""After forwarding: mark, flag or move each settled mail (INVOICE_RELAY_AFTER_FORWARD).

Runs after the send loop, in an IMAP session of its own that SELECTs the folder. The
order keeps the guarantees: an action is recorded only after the server did it, so a
crash repeats the action and nothing else (adding a flag twice changes nothing). A
move records `copying` before the COPY (or MOVE) goes out; a later poll that finds
that state looks for the Message-ID in the target before it copies again, so a crash
between COPY and EXPUNGE leaves at worst the mail in both folders, never in neither
and never twice in the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from worker.errors import MailboxError, TokenEndpointError
from worker.faults import Checkpoint, CrashPoint, no_checkpoint
from worker.models import AfterForward, MailActionMode, UntidiedMail
from worker.relay.ports import MailActions, MailActionStore
from worker.relay.settled import (
    MoveSupport,
    Settlement,
    move_problem,
    move_support,
    searchable_message_id,
    settlement,
)

log = logging.getLogger(__name__)

_FLAGS = {MailActionMode.SEEN: "\\Seen", MailActionMode.FLAG: "\\Flagged"}
GONE_NOTE = "the mail left the folder before the relay acted on it"
UNSURE_NOTE = (
    "a copy may be in the target already and the mail has no Message-ID that can be "
    "looked for: left where it is"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TidyReport:
    acted: int = 0  # mails whose action was taken (and recorded) now
    problem: str | None = None  # why nothing could be done, for the poll's report


class MailTidier:
    """Acts on the settled mails of one folder; build one per poll configuration."""

    def __init__(
        self,
        *,
        after: AfterForward,
        mailbox: str,  # the audit's name of the folder
        actions: MailActions,
        store: MailActionStore,
        clock: Callable[[], datetime],
        checkpoint: Checkpoint = no_checkpoint,
        batch_size: int = 500,
    ) -> None:
        self._after = after
        self._mailbox = mailbox
        self._actions = actions
        self._store = store
        self._clock = clock
        self._checkpoint = checkpoint
        self._batch_size = batch_size

    def tidy(self, uidvalidity: int) -> TidyReport:
        """Act on the settled mails recorded under `uidvalidity`. A server that cannot
        do what is asked is reported, never worked around (no folder is created)."""
        if not self._after.changes_mailbox:
            return TidyReport()
        untidied = self._store.untidied_mails(
            mailbox=self._mailbox, uidvalidity=uidvalidity, limit=self._batch_size
        )
        settled = [mail for mail in untidied if settlement(mail.parts) is Settlement.SETTLED]
        if not settled:
            return TidyReport()
        status = self._actions.open_for_actions()
        try:
            if status.uidvalidity != uidvalidity:
                return TidyReport()  # the folder was renumbered: the next poll rescans it
            if self._after.mode is MailActionMode.MOVE:
                return self._move_all(uidvalidity, settled)
            return self._flag_all(uidvalidity, settled)
        finally:
            self._actions.close()

    # --- seen / flag: one idempotent STORE --------------------------------------------

    def _flag_all(self, uidvalidity: int, mails: Sequence[UntidiedMail]) -> TidyReport:
        uids = [mail.uid for mail in mails]
        present = self._actions.present_uids(uids)
        self._skip(uidvalidity, [uid for uid in uids if uid not in present], GONE_NOTE)
        acted = sorted(present)
        if acted:
            self._actions.add_flag(acted, _FLAGS[self._after.mode])
            self._checkpoint(CrashPoint.AFTER_MAIL_ACTION)
            self._done(uidvalidity, acted)
            log.info(
                "%s settled mail(s) %s",
                len(acted),
                self._after.done_text,
                extra={"action": "mail_flagged", "mailbox": self._mailbox},
            )
        return TidyReport(acted=len(acted))

    # --- move ----------------------------------------------------------------------

    def _move_all(self, uidvalidity: int, mails: Sequence[UntidiedMail]) -> TidyReport:
        folder = self._after.folder or ""
        support = move_support(self._actions.capabilities())
        problem = move_problem(
            support,
            folder=folder,
            folder_exists=support is not MoveSupport.NONE and self._actions.folder_exists(folder),
        )
        if problem is not None:
            log.warning(
                "cannot move settled mail: %s",
                problem,
                extra={"action": "mail_action_impossible", "mailbox": self._mailbox},
            )
            return TidyReport(problem=problem)
        present = self._actions.present_uids([mail.uid for mail in mails])
        acted = 0
        for mail in mails:
            if self._move_one(uidvalidity, mail, folder, support, mail.uid in present):
                acted += 1
        return TidyReport(acted=acted)

    def _move_one(
        self,
        uidvalidity: int,
        mail: UntidiedMail,
        folder: str,
        support: MoveSupport,
        present: bool,
    ) -> bool:
        if mail.copy_started:
            return self._resume(uidvalidity, mail, folder, present)
        if not present:
            self._skip(uidvalidity, [mail.uid], GONE_NOTE)
            return False
        self._store.start_copy(
            mailbox=self._mailbox, uidvalidity=uidvalidity, uid=mail.uid, now=self._clock()
        )
        self._copy_and_expunge(mail.uid, folder, support)
        self._done(uidvalidity, [mail.uid])
        return True

    def _copy_and_expunge(self, uid: int, folder: str, support: MoveSupport) -> None:
        if support is MoveSupport.MOVE:
            self._actions.move(uid, folder)
        else:
            self._actions.copy(uid, folder)
            self._checkpoint(CrashPoint.AFTER_COPY)
            self._actions.expunge_uid(uid)
        self._checkpoint(CrashPoint.AFTER_MAIL_ACTION)
        log.info(
            "settled mail moved to %s",
            folder,
            extra={
                "action": "mail_moved",
                "mailbox": self._mailbox,
                "uid": uid,
                "how": support.value,
            },
        )

    def _resume(self, uidvalidity: int, mail: UntidiedMail, folder: str, present: bool) -> bool:
        """An earlier COPY or MOVE may have gone out (the relay stopped before it was
        recorded): look before copying again."""
        if not searchable_message_id(mail.message_id):
            if present:
                log.warning(
                    "not moving mail again: %s",
                    UNSURE_NOTE,
                    extra={"action": "mail_action_skipped", "uid": mail.uid},
                )
            self._skip(uidvalidity, [mail.uid], UNSURE_NOTE if present else GONE_NOTE)
            return False
        copied = self._actions.folder_holds(folder, mail.message_id)
        if copied:
            if present:
                self._expunge_copied(mail.uid)
            self._done(uidvalidity, [mail.uid])
            return True
        if not present:
            self._skip(uidvalidity, [mail.uid], GONE_NOTE)
            return False
        support = move_support(self._actions.capabilities())
        self._copy_and_expunge(mail.uid, folder, support)
        self._done(uidvalidity, [mail.uid])
        return True

    def _expunge_copied(self, uid: int) -> None:
        if "UIDPLUS" in self._actions.capabilities():
            self._actions.expunge_uid(uid)
            return
        # MOVE without UIDPLUS: only a plain EXPUNGE could remove it, which might take
        # mail a person marked deleted. Both folders hold it; nothing is lost.
        log.warning(
            "the mail is in the target already and stays in the folder too (no UIDPLUS)",
            extra={"action": "mail_left_in_both", "uid": uid},
        )

    # --- recording -------------------------------------------------------------------

    def _done(self, uidvalidity: int, uids: Sequence[int]) -> None:
        self._store.record_mail_actions(
            mailbox=self._mailbox,
            uidvalidity=uidvalidity,
            uids=uids,
            action=self._after.done_text,
            now=self._clock(),
        )

    def _skip(self, uidvalidity: int, uids: Sequence[int], note: str) -> None:
        if uids:
            self._store.record_mail_actions(
                mailbox=self._mailbox,
                uidvalidity=uidvalidity,
                uids=uids,
                action=None,
                note=note,
                now=self._clock(),
            )


def tidy_quietly(tidier: MailTidier, uidvalidity: int) -> TidyReport:
    """The poll's view: an IMAP failure after forwarding is reported, not raised, since
    everything forwarded is recorded and the next poll takes the action."""
    try:
        return tidier.tidy(uidvalidity)
    except (MailboxError, TokenEndpointError) as exc:
        log.warning(
            "after-forward action failed: %s",
            exc,
            extra={"action": "mail_action_failed"},
        )
        return TidyReport(problem=str(exc))
