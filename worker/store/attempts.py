"""`delivery_attempts`: each try at delivering a document, with the destination's answer.

Written by the marks of `worker.store.queue` inside their own transaction, after their
lease check passed: an attempt is recorded exactly when the document's new state is,
and a stale owner (`LeaseLost`) records neither. Bounded: a document keeps its last
`KEPT_ATTEMPTS` rows (its `attempts` column keeps counting them all).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.mail.text import clean_text
from worker.models import KEPT_ATTEMPTS, AttemptOutcome, DeliveryAttempt
from worker.store.schema import delivery_attempts

# Characters of an answer kept. Adapters clean and cap a destination's answer already;
# cleaned once more here, as one line, because a session's failure may carry a library's
# own text.
ANSWER_LIMIT: Final = 1000


def record_attempt(
    connection: Connection,
    *,
    document_id: int,
    outcome: AttemptOutcome,
    answer: str,
    via: str,
    attempted_at: sa.ColumnElement[datetime],
) -> None:
    """One attempt of `document_id`, in the caller's transaction; the oldest beyond the
    last `KEPT_ATTEMPTS` go."""
    connection.execute(
        sa.insert(delivery_attempts).values(
            document_id=document_id,
            attempted_at=attempted_at,
            outcome=outcome.value,
            answer=clean_text(answer, ANSWER_LIMIT),
            via=via,
        )
    )
    # Ids grow with time within a document: its writes are serialised by its lease
    # check, an UPDATE of its `documents` row that holds the row's lock until commit.
    first_dropped = (
        sa.select(delivery_attempts.c.id)
        .where(delivery_attempts.c.document_id == document_id)
        .order_by(delivery_attempts.c.id.desc())
        .offset(KEPT_ATTEMPTS)
        .limit(1)
        .scalar_subquery()
    )
    connection.execute(
        sa.delete(delivery_attempts).where(
            delivery_attempts.c.document_id == document_id,
            delivery_attempts.c.id <= first_dropped,
        )
    )


def attempt_history(connection: Connection, document_id: int) -> tuple[DeliveryAttempt, ...]:
    """The kept attempts of `document_id`, oldest first."""
    rows = connection.execute(
        sa.select(
            delivery_attempts.c.attempted_at,
            delivery_attempts.c.outcome,
            delivery_attempts.c.answer,
            delivery_attempts.c.via,
        )
        .where(delivery_attempts.c.document_id == document_id)
        .order_by(delivery_attempts.c.id)
    ).all()
    return tuple(
        DeliveryAttempt(
            attempted_at=row.attempted_at,
            outcome=AttemptOutcome(row.outcome),
            answer=row.answer,
            via=row.via,
        )
        for row in rows
    )
