"""Dedup per destination: the statement that claims a document, and the lookup of the
document a claim collided with.

Documents are unique by (destination, SHA-256) and (destination, content key), so the
database decides, among replicas recording one PDF at once, which claim wins. A
document older than destinations (destination NULL) is known to every destination: a
claim that such a document already covers inserts nothing. No document is ever written
with a NULL destination again, so that part of the check cannot race.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.store.engine import Insert
from worker.store.schema import documents

# The columns a claim writes; each is bound as `new_<name>`.
CLAIMED: Final = (
    "destination",
    "mailbox",
    "sha256",
    "fingerprint",
    "content_key",
    "state",
    "attempts",
    "next_attempt_at",
    "filename",
    "size_bytes",
    "resend_count",
    "created_at",
)


def claim_statement(insert: Insert) -> sa.Executable:
    """INSERT ... SELECT ... WHERE no older document covers it ... ON CONFLICT DO NOTHING
    RETURNING id: an id when the document is new for its destination, else nothing.

    `insert` is `documents`' dialect insert. No conflict target: a clash on the
    SHA-256 or on the content key both mean "known"."""
    bound = {name: sa.bindparam(f"new_{name}", type_=documents.c[name].type) for name in CLAIMED}
    legacy = (
        sa.select(documents.c.id)
        .where(
            documents.c.destination.is_(None),
            sa.or_(
                documents.c.sha256 == bound["sha256"],
                documents.c.content_key == bound["content_key"],
            ),
        )
        .exists()
    )
    # The SELECT has a WHERE: SQLite needs one before ON CONFLICT (its parser).
    rows = sa.select(*(bound[name] for name in CLAIMED)).where(~legacy)
    return (
        insert.from_select(list(CLAIMED), rows).on_conflict_do_nothing().returning(documents.c.id)
    )


def destination_matches(destination: str | None) -> sa.ColumnElement[bool]:
    """The documents a PDF bound for `destination` is compared with: that destination's
    and those older than destinations. None: the older ones only."""
    if destination is None:
        return documents.c.destination.is_(None)
    return sa.or_(documents.c.destination == destination, documents.c.destination.is_(None))


def known_document(
    connection: Connection, sha256: str | None, content_key: str | None, destination: str | None
) -> tuple[int, str] | None:
    """The document of `destination` (or older than destinations) that already has this
    SHA-256 or content key, and which key matched ("sha256" first, then "content
    fingerprint"); None when neither is known there."""
    scope = destination_matches(destination)
    by_sha = connection.execute(
        sa.select(documents.c.id)
        .where(documents.c.sha256 == sha256, scope)
        .order_by(documents.c.id)
        .limit(1)
    ).scalar_one_or_none()
    if by_sha is not None:
        return by_sha, "sha256"
    if content_key is not None:
        by_content = connection.execute(
            sa.select(documents.c.id)
            .where(documents.c.content_key == content_key, scope)
            .order_by(documents.c.id)
            .limit(1)
        ).scalar_one_or_none()
        if by_content is not None:
            return by_content, "content fingerprint"
    return None
