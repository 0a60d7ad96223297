"""After forwarding: which mails may be acted on, and what was done to each
(`mail_actions`, shown as `audit_log.mail_action`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import sqlalchemy as sa

from worker.models import DocumentState, PartState, SightingKind, UntidiedMail
from worker.store.engine import SqlBase
from worker.store.schema import documents, mail_actions, sightings

COPYING: Final = "copying"
DONE: Final = "done"
SKIPPED: Final = "skipped"


class MailActionRows(SqlBase):
    """The queries of `worker.relay.ports.MailActionStore`."""

    def untidied_mails(self, *, mailbox: str, uidvalidity: int, limit: int) -> list[UntidiedMail]:
        """Up to `limit` mails (lowest UID first) that hold a forwarded document, or a
        duplicate of one, and whose action is not recorded as done or skipped; with every
        sighting of each, for `worker.relay.settled` to judge."""
        action = mail_actions.alias("action")
        forwarded = (
            sa.select(sightings.c.uid)
            .distinct()
            .join(documents, documents.c.id == sightings.c.document_id)
            .outerjoin(
                action,
                sa.and_(
                    action.c.mailbox == sightings.c.mailbox,
                    action.c.uidvalidity == sightings.c.uidvalidity,
                    action.c.uid == sightings.c.uid,
                ),
            )
            .where(
                sightings.c.mailbox == mailbox,
                sightings.c.uidvalidity == uidvalidity,
                documents.c.state == DocumentState.FORWARDED.value,
                sa.or_(action.c.state.is_(None), action.c.state == COPYING),
            )
            .order_by(sightings.c.uid)
            .limit(limit)
        )
        with self._read() as connection:
            uids = [int(uid) for uid in connection.execute(forwarded).scalars()]
            if not uids:
                return []
            rows = connection.execute(
                sa.select(
                    sightings.c.uid,
                    sightings.c.kind,
                    sightings.c.message_id,
                    documents.c.state,
                )
                .outerjoin(documents, documents.c.id == sightings.c.document_id)
                .where(
                    sightings.c.mailbox == mailbox,
                    sightings.c.uidvalidity == uidvalidity,
                    sightings.c.uid.in_(uids),
                )
                .order_by(sightings.c.uid, sightings.c.id)
            ).all()
            copying = set(
                connection.execute(
                    sa.select(mail_actions.c.uid).where(
                        mail_actions.c.mailbox == mailbox,
                        mail_actions.c.uidvalidity == uidvalidity,
                        mail_actions.c.uid.in_(uids),
                        mail_actions.c.state == COPYING,
                    )
                ).scalars()
            )
        parts: dict[int, list[PartState]] = {uid: [] for uid in uids}
        message_ids: dict[int, str] = {}
        for row in rows:
            parts[int(row.uid)].append(
                PartState(
                    kind=SightingKind(row.kind),
                    document_state=DocumentState(row.state) if row.state else None,
                )
            )
            message_ids.setdefault(int(row.uid), row.message_id or "")
        return [
            UntidiedMail(
                uid=uid,
                message_id=message_ids.get(uid, ""),
                parts=tuple(parts[uid]),
                copy_started=uid in copying,
            )
            for uid in uids
        ]

    def start_copy(self, *, mailbox: str, uidvalidity: int, uid: int, now: datetime) -> None:
        """Before a COPY or MOVE: from now on a crash makes the next poll look first."""
        statement = self._insert(mail_actions).values(
            mailbox=mailbox, uidvalidity=uidvalidity, uid=uid, state=COPYING, updated_at=now
        )
        with self._write() as connection:
            # Already `copying` (a repeat after a crash): nothing to change.
            connection.execute(statement.on_conflict_do_nothing())

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
        """The action taken (`done`), or none and why (`skipped`, action None), for each
        mail; a mail recorded as done or skipped before is left as it was."""
        if not uids:
            return
        state = DONE if action is not None else SKIPPED
        statement = self._insert(mail_actions)
        statement = statement.on_conflict_do_update(
            index_elements=[mail_actions.c.mailbox, mail_actions.c.uidvalidity, mail_actions.c.uid],
            set_={
                "state": statement.excluded.state,
                "action": statement.excluded.action,
                "note": statement.excluded.note,
                "updated_at": statement.excluded.updated_at,
            },
            where=mail_actions.c.state == COPYING,
        )
        values = [
            {
                "mailbox": mailbox,
                "uidvalidity": uidvalidity,
                "uid": uid,
                "state": state,
                "action": action,
                "note": note,
                "updated_at": now,
            }
            for uid in uids
        ]
        with self._write() as connection:
            connection.execute(statement, values)
