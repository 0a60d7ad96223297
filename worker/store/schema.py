"""Tables and the `audit_log` view (their history: migrations/versions; engines and
transactions: `worker.store.engine`).

The table and column names are public: the accountant queries them (and above all the
`audit_log` view) with plain SQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back as an aware UTC datetime.

    SQLite has no time zones: values are stored as naive UTC text. A naive value handed
    in (a mail's Date header without a zone) is taken as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

mailbox_state = sa.Table(
    "mailbox_state",
    metadata,
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("last_uid", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=True),
    # = fingerprint only when the document was claimed in content dedup mode
    sa.Column("content_key", sa.Text, nullable=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
    sa.Column("lease_until", UtcDateTime(), nullable=True),
    # Who holds the lease (a random token per process run); every write under it checks
    # both, so a stale owner changes nothing (worker.store.leases).
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("forwarded_message_id", sa.Text, nullable=True),
    sa.Column("forwarded_at", UtcDateTime(), nullable=True),
    sa.Column("last_answer", sa.Text, nullable=True),
    sa.Column("filename", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("resend_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # Written before an API upload goes out: a later attempt, by any owner, first asks
    # the API whether it has the document (`POST /documents/exists`).
    sa.Column("upload_started_at", UtcDateTime(), nullable=True),
    sa.Column("delivered_via", sa.Text, nullable=True),  # "smtp" or "getmyinvoices"
    # The Message-ID or the documentUid; "" when GetMyInvoices had the document already.
    sa.Column("delivery_id", sa.Text, nullable=True),
    # Why a pending document waits for a limit of the destination (and until when);
    # the audit's reason while it waits. Cleared by the next attempt's outcome.
    sa.Column("held_reason", sa.Text, nullable=True),
    # Where it goes ("smtp:<forward_to>", "getmyinvoices:<account>", or a route's own
    # `destination`): dedup is per destination. NULL for a document that existed before
    # destinations did: it is known to every destination, so nothing already forwarded
    # is forwarded again anywhere. No new document is ever written with NULL.
    sa.Column("destination", sa.Text, nullable=True),
    # The mailbox folder ("user@host/folder") whose mail introduced it: the route on
    # that folder delivers it, and only that route's polls send it.
    sa.Column("mailbox", sa.Text, nullable=True),
    sa.UniqueConstraint("destination", "sha256", name="uq_documents_destination_sha256"),
    sa.UniqueConstraint("destination", "content_key", name="uq_documents_destination_content_key"),
    sa.CheckConstraint("state IN ('pending', 'forwarded', 'failed')", name="ck_documents_state"),
    sa.Index("ix_documents_state_next_attempt_at", "state", "next_attempt_at"),
    sa.Index("ix_documents_lease_owner", "lease_owner"),
    sa.Index("ix_documents_sha256", "sha256"),
    sa.Index("ix_documents_content_key", "content_key"),
    sa.Index("ix_documents_mailbox_state", "mailbox", "state"),
)

# Each try at delivering a document, written in the same transaction (and under the
# same lease check) as the document's new state: `attempted_at` on the database's clock,
# `outcome` a `worker.models.AttemptOutcome`, `answer` the destination's words. A
# document keeps its last `worker.models.KEPT_ATTEMPTS` rows; `documents.attempts`
# keeps counting.
delivery_attempts = sa.Table(
    "delivery_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_delivery_attempts_document_id_documents"),
        nullable=False,
    ),
    sa.Column("attempted_at", UtcDateTime(), nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("via", sa.Text, nullable=False),
    sa.CheckConstraint(
        "outcome IN ('forwarded', 'retry', 'failed', 'held', 'released')",
        name="ck_delivery_attempts_outcome",
    ),
    sa.Index("ix_delivery_attempts_document_id", "document_id", "id"),
)

# One mailbox's poll lease: a row, not a database session, so that a node lost without a
# word (its session lingers for hours) or a frozen process loses it when it expires.
# `expires_at` is on the database's clock.
poll_leases = sa.Table(
    "poll_leases",
    metadata,
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
)

# A document's PDF while it is still needed (until forwarded, unless KEEP_PDFS). Apart
# from `documents`, so that changing a document's state never rewrites its bytes (SQLite
# rewrites a whole row, blob included), and so that a large PDF is written through
# SQLite's blob I/O into a row whose last column is the blob (zeroblob then stays lazy).
document_contents = sa.Table(
    "document_contents",
    metadata,
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_document_contents_document_id_documents"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("content", sa.LargeBinary, nullable=False),
)

sightings = sa.Table(
    "sightings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("mailbox", sa.Text, nullable=False),
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("uid", sa.BigInteger, nullable=False),
    sa.Column("part", sa.Text, nullable=False),
    sa.Column("received_at", UtcDateTime(), nullable=False),
    sa.Column("mail_date", UtcDateTime(), nullable=True),
    sa.Column("message_id", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("sender", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("subject", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("filename", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.Text, nullable=True),
    sa.Column("fingerprint", sa.Text, nullable=True),
    sa.Column("invoice_number", sa.Text, nullable=True),
    # The first pages read as several different invoice numbers (true, else NULL):
    # `invoice_number` is the first of them and is not filed as the document's number.
    sa.Column("invoice_number_ambiguous", sa.Boolean, nullable=True),
    # The first pages matched INVOICE_RELAY_GMI_CREDIT_NOTE_PATTERN (true, else NULL).
    sa.Column("credit_note", sa.Boolean, nullable=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    # worker.models.ReasonCode: what code compares; `reason` is for people.
    sa.Column("reason_code", sa.Text, nullable=True),
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_sightings_document_id_documents"),
        nullable=True,
    ),
    sa.Column(
        "duplicate_of",
        sa.Integer,
        sa.ForeignKey("sightings.id", name="fk_sightings_duplicate_of_sightings"),
        nullable=True,
    ),
    sa.Column("tries", sa.Integer, nullable=False, server_default=sa.text("1")),
    # The route's name when the sighting was recorded (NULL before routes: `default`).
    # Informative: the folder, not the name, keys the sighting, so a renamed route
    # rescans nothing.
    sa.Column("route", sa.Text, nullable=True),
    sa.UniqueConstraint("mailbox", "uidvalidity", "uid", "part", name="uq_sightings_location"),
    sa.CheckConstraint(
        "kind IN ('document', 'duplicate', 'rejected', 'error', 'no_pdf')",
        name="ck_sightings_kind",
    ),
    sa.Index("ix_sightings_document_id", "document_id"),
    sa.Index("ix_sightings_received_at", "received_at"),
    sa.Index("ix_sightings_invoice_number", "invoice_number"),
)

# Failure notices (worker.relay.notify): one row per summary mail, and the failed documents
# and the rejected/error sightings it covered, so that no row is notified twice.
notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sent_at", UtcDateTime(), nullable=False),
    sa.Column("recipient", sa.Text, nullable=False),
    # The highest rejected/error sighting id this or an earlier notice covered. Before
    # `notified_sightings` it meant "every one up to here was covered", which skips rows
    # committed out of id order; it is kept going up for a downgrade.
    sa.Column("last_sighting_id", sa.Integer, nullable=False),
    sa.Column("failed_documents", sa.Integer, nullable=False),
    sa.Column("problem_sightings", sa.Integer, nullable=False),
    # The mailbox folder whose rows it covered (NULL: before notices were per mailbox).
    sa.Column("mailbox", sa.Text, nullable=True),
)

# A rejected/error sighting a notice covered; gone with its sighting (a mail's error
# placeholder gives way to its parts, and SQLite may give a new row the same id).
notified_sightings = sa.Table(
    "notified_sightings",
    metadata,
    sa.Column(
        "sighting_id",
        sa.Integer,
        sa.ForeignKey(
            "sightings.id", name="fk_notified_sightings_sighting_id_sightings", ondelete="CASCADE"
        ),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column(
        "notification_id",
        sa.Integer,
        sa.ForeignKey(
            "notifications.id", name="fk_notified_sightings_notification_id_notifications"
        ),
        nullable=False,
    ),
)

# Who sends a mailbox's failure notice now: one process across replicas. A lease like
# `poll_leases` (renewed by the owner's heartbeat; `expires_at` on the database's clock).
notice_leases = sa.Table(
    "notice_leases",
    metadata,
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
)

notified_documents = sa.Table(
    "notified_documents",
    metadata,
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", name="fk_notified_documents_document_id_documents"),
        primary_key=True,
    ),
    sa.Column(
        "notification_id",
        sa.Integer,
        sa.ForeignKey(
            "notifications.id", name="fk_notified_documents_notification_id_notifications"
        ),
        nullable=False,
    ),
)

# What INVOICE_RELAY_AFTER_FORWARD did to each mail (one row per mail, not per part):
# `copying` is written before a COPY or MOVE goes out, so that after a crash the next
# poll looks in the target before copying again; `done` carries the audit's text;
# `skipped` means the mail can no longer be acted on (`note` says why). The key makes
# the database decide that a mail is acted on once.
mail_actions = sa.Table(
    "mail_actions",
    metadata,
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("uidvalidity", sa.BigInteger, primary_key=True),
    sa.Column("uid", sa.BigInteger, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.CheckConstraint("state IN ('copying', 'done', 'skipped')", name="ck_mail_actions_state"),
)

# The status page's signed-in browsers. The cookie carries a random token; only its
# SHA-256 is kept, so a copy of the database signs nobody in. Deleting the row (logout,
# idle timeout) ends the session however long the cookie's signature stays valid.
web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("token_hash", sa.Text, primary_key=True),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("csrf_token", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("last_seen_at", UtcDateTime(), nullable=False),
)

# OAuth2 tokens (worker.store.tokens), one row per identity (provider, tenant, client, user).
# Only sealed values (AES-GCM, worker.auth.crypto): no plaintext token is ever stored, and
# no view reads this table.
oauth_tokens = sa.Table(
    "oauth_tokens",
    metadata,
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("sealed_access", sa.LargeBinary),
    sa.Column("access_expires_at", UtcDateTime()),
    sa.Column("sealed_refresh", sa.LargeBinary),
    sa.Column("origin", sa.Text),  # keyed digest of the configured refresh token
    sa.Column("refreshed_at", UtcDateTime()),
)

# The API budgets (worker.relay.budget): per destination ("getmyinvoices:<account>"), one
# row per fixed window with its start and what it used, and a `hold` row whose
# window_start is when a limit the API reported ends (`note` names it).
delivery_budgets = sa.Table(
    "delivery_budgets",
    metadata,
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("window", sa.Text, primary_key=True),
    sa.Column("window_start", UtcDateTime(), nullable=False),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("note", sa.Text, nullable=False, server_default=sa.text("''")),
)

# One replica per (route, fire time): the one whose INSERT wins polls; the others log
# `poll_skipped`. Rows older than a day are deleted (`forget_fires_before`).
poll_claims = sa.Table(
    "poll_claims",
    metadata,
    sa.Column("route", sa.Text, primary_key=True),
    sa.Column("fire_time", UtcDateTime(), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("claimed_at", UtcDateTime(), nullable=False),
)

# A route's last poll by any replica: its health is its last success, whoever polled.
route_polls = sa.Table(
    "route_polls",
    metadata,
    sa.Column("route", sa.Text, primary_key=True),
    sa.Column("last_started_at", UtcDateTime(), nullable=False),
    sa.Column("last_finished_at", UtcDateTime(), nullable=False),
    sa.Column("last_success_at", UtcDateTime(), nullable=True),
    sa.Column("last_result", sa.Text, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("owner", sa.Text, nullable=False),
)

# The view's current definition. Migrations carry their own frozen copy; a test checks
# that both yield the same columns.
AUDIT_VIEW_SQL: Final = """
CREATE VIEW audit_log AS
SELECT
    s.id AS id,
    s.received_at AS received_at,
    s.mail_date AS mail_date,
    s.mailbox AS mailbox,
    s.uidvalidity AS uidvalidity,
    s.uid AS uid,
    s.message_id AS message_id,
    s.sender AS sender,
    s.subject AS subject,
    s.filename AS filename,
    s.size_bytes AS size_bytes,
    s.sha256 AS sha256,
    s.fingerprint AS fingerprint,
    s.invoice_number AS invoice_number,
    CASE WHEN s.kind = 'document' THEN d.state ELSE s.kind END AS outcome,
    CASE
        WHEN s.kind = 'document' AND d.state = 'failed' THEN COALESCE(d.last_answer, s.reason)
        WHEN s.kind = 'document' AND d.state = 'pending' THEN COALESCE(d.held_reason, s.reason)
        ELSE s.reason
    END AS reason,
    s.duplicate_of AS duplicate_of,
    CASE WHEN s.kind = 'document' THEN d.forwarded_at END AS forwarded_at,
    CASE WHEN s.kind = 'document' THEN d.forwarded_message_id END AS forwarded_message_id,
    CASE WHEN s.kind = 'document' THEN d.attempts END AS attempts,
    CASE WHEN m.state = 'done' THEN m.action END AS mail_action,
    CASE WHEN s.kind = 'document' THEN d.delivered_via END AS delivered_via,
    CASE WHEN s.kind = 'document' THEN d.delivery_id END AS delivery_id,
    COALESCE(s.route, 'default') AS route,
    d.destination AS destination
FROM sightings AS s
LEFT JOIN documents AS d ON d.id = s.document_id
LEFT JOIN mail_actions AS m
    ON m.mailbox = s.mailbox AND m.uidvalidity = s.uidvalidity AND m.uid = s.uid
"""

AUDIT_COLUMNS: Final = (
    "id",
    "received_at",
    "mail_date",
    "mailbox",
    "uidvalidity",
    "uid",
    "message_id",
    "sender",
    "subject",
    "filename",
    "size_bytes",
    "sha256",
    "fingerprint",
    "invoice_number",
    "outcome",
    "reason",
    "duplicate_of",
    "forwarded_at",
    "forwarded_message_id",
    "attempts",
    "mail_action",
    "delivered_via",
    "delivery_id",
    "route",
    "destination",
)

# The view described for reading only; kept out of `metadata` so that create_all and
# Alembic's comparison never take it for a table.
view_metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log",
    view_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("received_at", UtcDateTime()),
    sa.Column("mail_date", UtcDateTime()),
    sa.Column("mailbox", sa.Text),
    sa.Column("uidvalidity", sa.BigInteger),
    sa.Column("uid", sa.BigInteger),
    sa.Column("message_id", sa.Text),
    sa.Column("sender", sa.Text),
    sa.Column("subject", sa.Text),
    sa.Column("filename", sa.Text),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("sha256", sa.Text),
    sa.Column("fingerprint", sa.Text),
    sa.Column("invoice_number", sa.Text),
    sa.Column("outcome", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("duplicate_of", sa.Integer),
    sa.Column("forwarded_at", UtcDateTime()),
    sa.Column("forwarded_message_id", sa.Text),
    sa.Column("attempts", sa.Integer),
    sa.Column("mail_action", sa.Text),
    sa.Column("delivered_via", sa.Text),
    sa.Column("delivery_id", sa.Text),
    sa.Column("route", sa.Text),
    sa.Column("destination", sa.Text),
)
