"""Alembic migrations: upgrade, agreement with worker.store.schema's tables and view, downgrade."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from tests.documents import DESTINATION, poll_owner
from worker.mail.verdicts import NOTICE_LOOP_REASON
from worker.models import (
    AuditFilter,
    DedupMode,
    MailHeaders,
    MailRecord,
    PartRecord,
    ReasonCode,
    SightingKind,
)
from worker.store import migrate, schema
from worker.store.engine import create_schema, make_engine
from worker.store.notices import SqlNoticeLog
from worker.store.sqlstore import SqlStore

REPO = Path(__file__).resolve().parents[2]
# The audit view's columns in the order the README shows them ("What is stored, and the
# audit log"): a user's queries depend on the names.
README_AUDIT_COLUMNS = [
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
]

# The view as 0006_mail_actions left it (before the delivery columns of 0008), and as
# 0008 left it (before the route columns of 0011).
AUDIT_COLUMNS_0006 = README_AUDIT_COLUMNS[: README_AUDIT_COLUMNS.index("mail_action") + 1]
AUDIT_COLUMNS_0008 = README_AUDIT_COLUMNS[: README_AUDIT_COLUMNS.index("delivery_id") + 1]


def view_columns(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.exec_driver_sql("SELECT * FROM audit_log WHERE 1 = 0")
            return list(result.keys())
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        inspector = sa.inspect(engine)
        return set(inspector.get_table_names()) | set(inspector.get_view_names())
    finally:
        engine.dispose()


def test_upgrade_head_on_an_empty_database(empty_database: str) -> None:
    assert migrate.current_revision(empty_database) is None
    assert not migrate.is_up_to_date(empty_database)
    migrate.upgrade_database(empty_database)
    assert migrate.current_revision(empty_database) == migrate.head_revision()
    assert migrate.is_up_to_date(empty_database)
    assert table_names(empty_database) == {
        "alembic_version",
        "mailbox_state",
        "documents",
        "document_contents",
        "sightings",
        "audit_log",
        "notifications",
        "notified_documents",
        "notified_sightings",
        "notice_leases",
        "mail_actions",
        "web_sessions",
        "oauth_tokens",
        "delivery_budgets",
        "delivery_attempts",
        "poll_leases",
        "poll_claims",
        "route_polls",
    }
    migrate.upgrade_database(empty_database)  # a second start-up changes nothing
    assert migrate.is_up_to_date(empty_database)


def test_the_head_constant_is_the_scripts_head() -> None:
    assert migrate.head_revision() == migrate.HEAD_REVISION


def test_a_current_database_is_checked_without_importing_alembic(empty_database: str) -> None:
    migrate.upgrade_database(empty_database)
    script = (
        "import sys; from worker.store.migrate import upgrade_database; "
        "upgrade_database(sys.argv[1]); print('alembic' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, empty_database],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "False"


def test_models_and_migrations_agree(empty_database: str) -> None:
    migrate.upgrade_database(empty_database)
    engine = make_engine(empty_database)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, schema.metadata) == []
    finally:
        engine.dispose()


def test_the_view_has_exactly_the_design_columns(empty_database: str, tmp_path: Path) -> None:
    migrate.upgrade_database(empty_database)
    assert view_columns(empty_database) == README_AUDIT_COLUMNS
    assert list(schema.AUDIT_COLUMNS) == README_AUDIT_COLUMNS
    assert [column.name for column in schema.audit_log.columns] == README_AUDIT_COLUMNS
    # The current definition in worker.store.schema (create_all in tests) yields the same columns.
    current = f"sqlite:///{tmp_path / 'current.db'}"
    engine = make_engine(current)
    create_schema(engine)
    engine.dispose()
    assert view_columns(current) == README_AUDIT_COLUMNS


def _insert_bogus(table: str) -> sa.Insert:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    if table == "documents":
        return sa.insert(schema.documents).values(
            sha256="x", state="bogus", next_attempt_at=now, created_at=now
        )
    if table == "delivery_attempts":
        return sa.insert(schema.delivery_attempts).values(
            document_id=1, attempted_at=now, outcome="bogus", answer="", via="smtp"
        )
    return sa.insert(schema.sightings).values(
        mailbox="m", uidvalidity=1, uid=1, part="", received_at=now, kind="bogus"
    )


@pytest.mark.parametrize("table", ["documents", "sightings", "delivery_attempts"])
def test_check_constraints_refuse_unknown_states(empty_database: str, table: str) -> None:
    migrate.upgrade_database(empty_database)
    engine = make_engine(empty_database)
    try:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
            connection.execute(_insert_bogus(table))
    finally:
        engine.dispose()


def test_the_store_works_on_a_migrated_database(empty_database: str) -> None:
    migrate.upgrade_database(empty_database)
    store = SqlStore(empty_database)
    try:
        (recorded,) = store.record_mails(
            destination=DESTINATION,
            owner=poll_owner(store, "INBOX"),
            mailbox="INBOX",
            uidvalidity=1,
            mails=[
                MailRecord(
                    uid=1,
                    headers=MailHeaders(subject="Invoice"),
                    parts=(PartRecord(part="", kind=SightingKind.NO_PDF),),
                )
            ],
            advance_to=1,
            dedup=DedupMode.CONTENT,
            keep_pdfs=False,
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )
        (row,) = store.audit(AuditFilter())
        assert row.id == recorded.sighting_id
        assert row.subject == "Invoice"
    finally:
        store.close()


def upgrade_together(url: str, processes: int) -> None:
    """`processes` processes started at once, each running the start-up upgrade of `url`;
    every one must succeed."""
    script = (
        "import sys; from worker.store.migrate import upgrade_database; "
        "upgrade_database(sys.argv[1])"
    )
    started = [
        subprocess.Popen(
            [sys.executable, "-c", script, url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    errors = [process.communicate(timeout=120)[1] for process in started]
    assert [process.returncode for process in started] == [0] * processes, errors
    assert migrate.is_up_to_date(url)


def test_replicas_upgrading_together_do_not_race(empty_database: str) -> None:
    # Replicas are processes: start three at once, each running the start-up upgrade.
    upgrade_together(empty_database, 3)


def test_processes_opening_a_fresh_sqlite_file_at_once_all_start(tmp_path: Path) -> None:
    # Each must switch the new file to WAL, which takes its exclusive lock; SQLite
    # answers "database is locked" at once rather than risk a deadlock. Fifteen rounds
    # of two processes (two start closer together than three on two cores): before the
    # retry in worker.store.engine, about a fifth of the processes failed.
    for round_number in range(15):
        upgrade_together(f"sqlite:///{tmp_path / f'relay-{round_number}.db'}", 2)


def test_in_process_upgrades_are_serialised(empty_database: str) -> None:
    failures: list[BaseException] = []
    barrier = threading.Barrier(3)

    def upgrade() -> None:
        try:
            barrier.wait()
            migrate.upgrade_database(empty_database)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert migrate.is_up_to_date(empty_database)


def test_downgrade_to_base_removes_everything(empty_database: str) -> None:
    migrate.upgrade_database(empty_database)
    migrate.downgrade_database(empty_database, "base")
    assert migrate.current_revision(empty_database) is None
    assert table_names(empty_database) == {"alembic_version"}
    migrate.upgrade_database(empty_database)
    assert view_columns(empty_database) == README_AUDIT_COLUMNS


def test_stored_pdfs_move_to_their_own_table_and_back(empty_database: str) -> None:
    # 0003 moves documents.content into document_contents; nothing kept may be lost,
    # and a forwarded document whose PDF was dropped gets no row.
    migrate.upgrade_database(empty_database, "0002_notifications")
    kept, large = b"%PDF-1.7 kept", b"%PDF-1.7 " + bytes(range(256)) * 8192
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            for number, content in enumerate([kept, None, large], start=1):
                connection.execute(
                    sa.text(
                        "INSERT INTO documents (id, sha256, state, attempts, next_attempt_at,"
                        " content, resend_count, created_at) VALUES (:id, :sha256, :state, 0,"
                        " :now, :content, 0, :now)"
                    ),
                    {
                        "id": number,
                        "sha256": f"sha-{number}",
                        "state": "forwarded" if content is None else "pending",
                        "now": datetime(2026, 11, 24, tzinfo=UTC),
                        "content": content,
                    },
                )
        migrate.upgrade_database(empty_database)
        with engine.connect() as connection:
            moved = connection.execute(
                sa.select(schema.document_contents).order_by(schema.document_contents.c.document_id)
            ).all()
        assert [(row.document_id, bytes(row.content)) for row in moved] == [(1, kept), (3, large)]

        migrate.downgrade_database(empty_database, "0002_notifications")
        with engine.connect() as connection:
            back = connection.execute(
                sa.text("SELECT id, content FROM documents ORDER BY id")
            ).all()
        assert [(row.id, row.content and bytes(row.content)) for row in back] == [
            (1, kept),
            (2, None),
            (3, large),
        ]
    finally:
        engine.dispose()


def test_loop_sightings_get_their_reason_code_and_lose_it_on_downgrade(
    empty_database: str,
) -> None:
    # 0004 adds sightings.reason_code; rows written before it by the notice loop guard get
    # their code from the text they were written with, and no other row gets one.
    migrate.upgrade_database(empty_database, "0003_document_contents")
    reasons = [NOTICE_LOOP_REASON, "sender not allowed: x@evil.example", None]
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            for uid, reason in enumerate(reasons, start=1):
                connection.execute(
                    sa.text(
                        "INSERT INTO sightings (id, mailbox, uidvalidity, uid, part, received_at,"
                        " kind, reason, tries) VALUES (:uid, 'm', 1, :uid, '', :now, :kind,"
                        " :reason, 1)"
                    ),
                    {
                        "uid": uid,
                        "now": datetime(2026, 11, 24, tzinfo=UTC),
                        "kind": "no_pdf" if reason is None else "rejected",
                        "reason": reason,
                    },
                )
        migrate.upgrade_database(empty_database)
        with engine.connect() as connection:
            coded = connection.execute(
                sa.text("SELECT id, reason, reason_code FROM sightings ORDER BY id")
            ).all()
        assert [(row.id, row.reason, row.reason_code) for row in coded] == [
            (1, NOTICE_LOOP_REASON, ReasonCode.NOTICE_LOOP.value),
            (2, reasons[1], None),
            (3, None, None),
        ]
        assert view_columns(empty_database) == README_AUDIT_COLUMNS

        migrate.downgrade_database(empty_database, "0003_document_contents")
        with engine.connect() as connection:
            back = connection.execute(sa.text("SELECT * FROM sightings ORDER BY id"))
            assert "reason_code" not in list(back.keys())
            assert [row.reason for row in back] == reasons
    finally:
        engine.dispose()


def test_the_alembic_ini_finds_the_same_scripts() -> None:
    config = Config(str(REPO / "alembic.ini"))
    assert ScriptDirectory.from_config(config).get_current_head() == migrate.head_revision()
    assert migrate.migrations_directory() == REPO / "migrations"


def test_web_sessions_come_and_go_with_0010(empty_database: str) -> None:
    migrate.upgrade_database(empty_database, "0010_web_sessions")
    assert "web_sessions" in table_names(empty_database)
    migrate.downgrade_database(empty_database, "0007_oauth_tokens")  # MERGE: its down_revision
    assert "web_sessions" not in table_names(empty_database)
    # 0010 leaves the view alone: it is the view 0006 made (0008 adds to it later).
    assert view_columns(empty_database) == AUDIT_COLUMNS_0006


def test_mail_actions_add_one_view_column_and_go_away_again(empty_database: str) -> None:
    # 0006 adds `mail_actions` and `audit_log.mail_action` at the view's end; the
    # downgrade gives back the view without it. A recorded sighting stays visible.
    revision = "0006_mail_actions"
    previous = "0005_leases"
    migrate.upgrade_database(empty_database, previous)
    old_columns = view_columns(empty_database)
    assert old_columns == AUDIT_COLUMNS_0006[:-1]
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO sightings (mailbox, uidvalidity, uid, part, received_at,"
                    " message_id, sender, subject, kind, tries) VALUES ('m', 1, 5, '',"
                    " :now, '', '', '', 'no_pdf', 1)"
                ),
                {"now": datetime(2026, 12, 1, tzinfo=UTC)},
            )
        migrate.upgrade_database(empty_database, revision)
        assert view_columns(empty_database) == AUDIT_COLUMNS_0006
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT uid, mail_action FROM audit_log")).all()
        assert [tuple(row) for row in rows] == [(5, None)]
        migrate.downgrade_database(empty_database, previous)
        assert view_columns(empty_database) == old_columns
        assert "mail_actions" not in table_names(empty_database)
    finally:
        engine.dispose()


def test_gmi_delivery_adds_two_view_columns_and_goes_away_again(empty_database: str) -> None:
    # 0008 adds `delivered_via` and `delivery_id` at the view's end, marks documents
    # forwarded before it as delivered by SMTP under their Message-ID, and adds the
    # API budgets; the downgrade gives back the view and tables as 0006 left them.
    previous = "0010_web_sessions"  # MERGE: the head of `layout` below 0008
    migrate.upgrade_database(empty_database, previous)
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            now = datetime(2026, 12, 1, tzinfo=UTC)
            connection.execute(
                sa.text(
                    "INSERT INTO documents (id, sha256, state, attempts, next_attempt_at,"
                    " forwarded_message_id, resend_count, created_at) VALUES"
                    " (1, 'a', 'forwarded', 1, :now, '<f@relay>', 0, :now),"
                    " (2, 'b', 'pending', 0, :now, NULL, 0, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO sightings (mailbox, uidvalidity, uid, part, received_at,"
                    " message_id, sender, subject, kind, tries, document_id) VALUES"
                    " ('m', 1, 5, '2', :now, '', '', '', 'document', 1, 1),"
                    " ('m', 1, 6, '2', :now, '', '', '', 'document', 1, 2)"
                ),
                {"now": now},
            )
        migrate.upgrade_database(empty_database)
        assert view_columns(empty_database) == README_AUDIT_COLUMNS
        assert "delivery_budgets" in table_names(empty_database)
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT uid, delivered_via, delivery_id FROM audit_log ORDER BY uid")
            ).all()
        assert [tuple(row) for row in rows] == [(5, "smtp", "<f@relay>"), (6, None, None)]
        migrate.downgrade_database(empty_database, previous)
        assert view_columns(empty_database) == AUDIT_COLUMNS_0006
        assert "delivery_budgets" not in table_names(empty_database)
    finally:
        engine.dispose()


def test_a_lease_taken_before_the_leases_migration_ends_with_it(empty_database: str) -> None:
    # 0005 gives leases live owners. A lease taken before it (up to an hour long, with no
    # owner to renew it or to be fenced by) would otherwise hold its document that long.
    before = "0004_reason_codes"
    migrate.upgrade_database(empty_database, before)
    now = datetime(2026, 11, 24, tzinfo=UTC)
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO documents (id, sha256, state, attempts, next_attempt_at,"
                    " lease_until, resend_count, created_at) VALUES (1, 'sha', 'pending', 0,"
                    " :now, :lease, 0, :now)"
                ),
                {"now": now, "lease": now + timedelta(hours=1)},
            )
            connection.execute(
                sa.text("INSERT INTO document_contents (document_id, content) VALUES (1, :pdf)"),
                {"pdf": b"%PDF-1.7"},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO sightings (mailbox, uidvalidity, uid, part, received_at,"
                    " message_id, sender, subject, kind, tries, document_id) VALUES"
                    " ('m', 1, 5, '2', :now, '', '', '', 'document', 1, 1)"
                ),
                {"now": now},
            )
        migrate.upgrade_database(empty_database, "0005_leases")
        with engine.connect() as connection:
            left = connection.execute(
                sa.text("SELECT lease_until, lease_owner FROM documents WHERE id = 1")
            ).one()
        assert tuple(left) == (None, None)  # the hour-long lease ended with the migration
        migrate.upgrade_database(empty_database)
        store = SqlStore(empty_database)
        try:
            (claimed,) = store.claim_due(
                now=now, limit=10, owner="next", lease_seconds=30, mailbox="m"
            )
        finally:
            store.close()
        assert claimed.document_id == 1
        migrate.downgrade_database(empty_database, before)
        assert "poll_leases" not in table_names(empty_database)
    finally:
        engine.dispose()


def test_delivery_attempts_start_with_each_known_delivery_and_go_away_again(
    empty_database: str,
) -> None:
    # 0014 adds `delivery_attempts`. A document forwarded before it has one known try,
    # its delivery (at forwarded_at, with its last answer and way); a pending or failed
    # one's tries were never recorded, and none is made up for it.
    previous = "0008_gmi_delivery"
    migrate.upgrade_database(empty_database, previous)
    forwarded_at = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            now = datetime(2026, 12, 1, tzinfo=UTC)
            connection.execute(
                sa.text(
                    "INSERT INTO documents (id, sha256, state, attempts, next_attempt_at,"
                    " forwarded_message_id, forwarded_at, last_answer, delivered_via,"
                    " delivery_id, resend_count, created_at) VALUES"
                    " (1, 'a', 'forwarded', 2, :now, '<f@relay>', :sent, '250 2.0.0 ok',"
                    " 'smtp', '<f@relay>', 0, :now),"
                    " (2, 'b', 'failed', 3, :now, NULL, NULL, '554 no', NULL, NULL, 0, :now),"
                    " (3, 'c', 'forwarded', 1, :now, NULL, :sent, '200 documentUid 7',"
                    " 'getmyinvoices', '7', 0, :now)"
                ),
                {"now": now, "sent": forwarded_at},
            )
        migrate.upgrade_database(empty_database)
        assert "delivery_attempts" in table_names(empty_database)
        store = SqlStore(empty_database)
        try:
            with store.engine.connect() as connection:
                rows = connection.execute(
                    sa.select(
                        schema.delivery_attempts.c.document_id,
                        schema.delivery_attempts.c.attempted_at,
                        schema.delivery_attempts.c.outcome,
                        schema.delivery_attempts.c.answer,
                        schema.delivery_attempts.c.via,
                    ).order_by(schema.delivery_attempts.c.id)
                ).all()
        finally:
            store.close()
        assert [tuple(row) for row in rows] == [
            (1, forwarded_at, "forwarded", "250 2.0.0 ok", "smtp"),
            (3, forwarded_at, "forwarded", "200 documentUid 7", "getmyinvoices"),
        ]
        migrate.downgrade_database(empty_database, previous)
        assert "delivery_attempts" not in table_names(empty_database)
        with engine.connect() as connection:
            kept = connection.execute(sa.text("SELECT count(*) FROM documents")).scalar_one()
        assert kept == 3
    finally:
        engine.dispose()


def test_invoice_number_certainty_comes_and_goes_with_0012(empty_database: str) -> None:
    # 0012 adds `sightings.invoice_number_ambiguous`; a sighting recorded before it has
    # NULL (its number counts as read unambiguously), and the view stays as it was.
    previous = "0014_delivery_attempts"  # its down_revision
    migrate.upgrade_database(empty_database, previous)
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO sightings (mailbox, uidvalidity, uid, part, received_at,"
                    " message_id, sender, subject, kind, tries, invoice_number) VALUES"
                    " ('m', 1, 5, '2', :now, '', '', '', 'rejected', 1, '1042')"
                ),
                {"now": datetime(2026, 12, 1, tzinfo=UTC)},
            )
        migrate.upgrade_database(empty_database, "0012_invoice_number_certainty")
        assert view_columns(empty_database) == AUDIT_COLUMNS_0008
        with engine.connect() as connection:
            row = connection.execute(
                sa.text("SELECT invoice_number, invoice_number_ambiguous FROM sightings")
            ).one()
        assert tuple(row) == ("1042", None)
        migrate.downgrade_database(empty_database, previous)
        with engine.connect() as connection:
            back = connection.execute(sa.text("SELECT * FROM sightings"))
            assert "invoice_number_ambiguous" not in list(back.keys())
            assert [r.invoice_number for r in back] == ["1042"]
        assert view_columns(empty_database) == AUDIT_COLUMNS_0008
    finally:
        engine.dispose()


def test_sightings_the_old_mark_covered_stay_notified(empty_database: str) -> None:
    # 0013 keeps what was notified per sighting: every rejected/error sighting at or
    # below a notice's `last_sighting_id` gets a row naming the first notice that
    # reached it; a later one, or one of another kind, none.
    migrate.upgrade_database(empty_database, "0011_destinations")
    now = datetime(2026, 12, 2, tzinfo=UTC)
    kinds = {1: "rejected", 2: "no_pdf", 3: "error", 4: "rejected", 6: "rejected"}
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            for sighting_id, kind in kinds.items():
                connection.execute(
                    sa.text(
                        "INSERT INTO sightings (id, mailbox, uidvalidity, uid, part, received_at,"
                        " message_id, sender, subject, kind, tries) VALUES (:id, 'm', 1, :id,"
                        " '2', :now, '', '', '', :kind, 1)"
                    ),
                    {"id": sighting_id, "now": now, "kind": kind},
                )
            for notification_id, mark in [(1, 1), (2, 4)]:
                connection.execute(
                    sa.text(
                        "INSERT INTO notifications (id, sent_at, recipient, last_sighting_id,"
                        " failed_documents, problem_sightings) VALUES (:id, :now, 'o@x', :mark,"
                        " 0, 1)"
                    ),
                    {"id": notification_id, "now": now, "mark": mark},
                )
        migrate.upgrade_database(empty_database)
        with engine.connect() as connection:
            marked = connection.execute(
                sa.text("SELECT sighting_id, notification_id FROM notified_sightings ORDER BY 1")
            ).all()
        assert [tuple(row) for row in marked] == [(1, 1), (3, 2), (4, 2)]
        problems = SqlNoticeLog(engine).unnotified("m", limit=10)
        assert [problem.audit_id for problem in problems] == [6]
        assert SqlNoticeLog(engine).last_notice("m") is not None  # the old notices count

        migrate.downgrade_database(empty_database, "0011_destinations")
        assert not {"notified_sightings", "notice_leases"} & table_names(empty_database)
        with engine.connect() as connection:
            columns = connection.execute(sa.text("SELECT * FROM notifications")).keys()
            assert "mailbox" not in list(columns)
    finally:
        engine.dispose()
