"""Error rows: sightings in `error` are retried on later polls, and become `rejected`
once they have been tried enough or can never be read again."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from worker.models import SightingKind
from worker.store.base import SqlBase
from worker.store.schema import sightings


class ErrorRows(SqlBase):
    """The queries of `worker.relay.ports.PollStore` about `error` sightings."""

    def error_uids(self, *, mailbox: str, uidvalidity: int, max_tries: int) -> list[int]:
        with self._read() as connection:
            uids = connection.execute(
                sa.select(sightings.c.uid)
                .distinct()
                .where(
                    sightings.c.mailbox == mailbox,
                    sightings.c.uidvalidity == uidvalidity,
                    sightings.c.kind == SightingKind.ERROR.value,
                    sightings.c.tries < max_tries,
                )
                .order_by(sightings.c.uid)
            ).scalars()
            return [int(uid) for uid in uids]

    def abandon_errors(
        self, *, mailbox: str, uidvalidity: int, uids: Sequence[int] | None, reason: str
    ) -> int:
        conditions = [
            sightings.c.mailbox == mailbox,
            sightings.c.uidvalidity == uidvalidity,
            sightings.c.kind == SightingKind.ERROR.value,
        ]
        if uids is not None:
            conditions.append(sightings.c.uid.in_(list(uids)))
        with self._write() as connection:
            result = connection.execute(
                sa.update(sightings)
                .where(*conditions)
                .values(
                    kind=SightingKind.REJECTED.value,
                    reason=sa.literal(reason + "; before: ")
                    + sa.func.coalesce(sightings.c.reason, ""),
                )
            )
            return result.rowcount

    def reject_exhausted_errors(self, *, mailbox: str, max_tries: int) -> int:
        reason = (
            sa.literal("gave up after ")
            + sa.cast(sightings.c.tries, sa.Text)
            + sa.literal(" tries: ")
            + sa.func.coalesce(sightings.c.reason, "")
        )
        with self._write() as connection:
            result = connection.execute(
                sa.update(sightings)
                .where(
                    sightings.c.mailbox == mailbox,
                    sightings.c.kind == SightingKind.ERROR.value,
                    sightings.c.tries >= max_tries,
                )
                .values(kind=SightingKind.REJECTED.value, reason=reason)
            )
            return result.rowcount
