"""INVOICE_RELAY_AFTER_FORWARD against Dovecot: `invoice-relay once` over a mailbox of
edge cases, with MOVE and with MOVE not announced (COPY + UID EXPUNGE), the crash
points of the action, and `check`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests import samples
from tests.integration.guarantee_tools import sql_rows, wait_for_leases
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from worker.faults import CRASH_EXIT_STATUS

TARGET = "Done"
# Each edge case: its mail and whether it is settled with an accepted PDF after one poll.
PDF_A = samples.invoice_pdf(number="9001", logo=False)
PDF_B = samples.invoice_pdf(number="9002", amount="12.00", logo=False)
PDF_FAILS = samples.invoice_pdf(number="9003", amount="13.00", logo=False)
PDF_WAITS = samples.invoice_pdf(number="9004", amount="14.00", logo=False)


def _invoice(name: str, *pdfs: tuple[str, bytes]) -> bytes:
    return samples.invoice_mail(pdfs=list(pdfs), message_id=f"<{name}@shop.example>")


EDGE_CASES: dict[str, tuple[bytes, bool]] = {
    "forwarded": (_invoice("forwarded", ("a.pdf", PDF_A)), True),
    "duplicate": (_invoice("duplicate", ("a-again.pdf", PDF_A)), True),
    "mixed": (_invoice("mixed", ("b.pdf", PDF_B), ("bad.pdf", samples.corrupt_pdf())), True),
    "rejected": (_invoice("rejected", ("bad.pdf", samples.corrupt_pdf())), False),
    "no-pdf": (samples.plain_mail(message_id="<no-pdf@shop.example>"), False),
    "failed": (_invoice("failed", ("fails.pdf", PDF_FAILS)), False),
    "pending": (_invoice("pending", ("waits.pdf", PDF_WAITS)), False),
    "dup-of-pending": (_invoice("dup-of-pending", ("waits-again.pdf", PDF_WAITS)), False),
    "failed-and-forwarded": (
        _invoice("failed-and-forwarded", ("a3.pdf", PDF_A), ("fails2.pdf", PDF_FAILS)),
        False,
    ),
}
SETTLED = {name for name, (_, settled) in EDGE_CASES.items() if settled}


def _carries(filename: str) -> object:
    def matches(message: EmailMessage) -> bool:
        return any(part.get_filename() == filename for part in message.iter_attachments())

    return matches


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything about the mailbox the relay could change."""

    folders: frozenset[str]
    inbox: dict[int, str]  # uid -> Message-ID
    flags: dict[int, frozenset[str]]
    target: tuple[str, ...]  # the Message-IDs in the target folder, sorted

    @classmethod
    def of(cls, imap: DovecotServer) -> Snapshot:
        folders = frozenset(imap.folders())
        target = imap.message_ids(TARGET).values() if TARGET in folders else ()
        return cls(
            folders=folders,
            inbox=imap.message_ids(),
            flags=imap.all_flags(),
            target=tuple(sorted(target)),
        )


def _mid(name: str) -> str:
    return f"<{name}@shop.example>"


def edge_mailbox(imap: DovecotServer, smtp: SmtpSink) -> dict[str, int]:
    """The edge cases in INBOX, the target folder created, and the sink scripted so that
    `failed` is refused for good and `pending` for now."""
    imap.create_folder(TARGET)
    smtp.fail_matching(_carries("fails.pdf"), 550, "no such invoice")  # type: ignore[arg-type]
    smtp.fail_matching(_carries("waits.pdf"), 451, "try later")  # type: ignore[arg-type]
    return {name: imap.append(raw) for name, (raw, _) in EDGE_CASES.items()}


def poll(env: Mapping[str, str]) -> str:
    result = run_relay(env, "once")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def mail_actions(database_url: str) -> dict[int, str | None]:
    rows = sql_rows(database_url, "SELECT DISTINCT uid, mail_action FROM audit_log")
    return {int(str(row["uid"])): row["mail_action"] for row in rows}  # type: ignore[misc]


@pytest.fixture(params=["move", "uidplus"])
def move_server(request: pytest.FixtureRequest, imap: DovecotServer) -> DovecotServer:
    """Dovecot announcing MOVE, or only UIDPLUS (so the relay must COPY and UID EXPUNGE)."""
    if request.param == "uidplus":
        announced = imap.drop_capabilities("MOVE")
        assert "MOVE" not in announced and "UIDPLUS" in announced
    return imap


def _env(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path, after: str, **extra: str
) -> dict[str, str]:
    return relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_AFTER_FORWARD=after,
        INVOICE_RELAY_RETRY_DELAY="1h",  # `pending` stays pending for the second poll
        **extra,
    )


def test_keep_changes_neither_flags_nor_folders(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    uids = edge_mailbox(imap, smtp)
    before = Snapshot.of(imap)
    recent = imap.all_flags(keep_recent=True)
    assert all("\\Recent" in flags for flags in recent.values())
    env = _env(imap, smtp, smtp_ca, tmp_path, "keep")
    poll(env)
    poll(env)
    assert Snapshot.of(imap) == before
    # Only a SELECT takes \Recent away: the relay EXAMINEd the folder.
    assert imap.all_flags(keep_recent=True) == recent
    actions = mail_actions(env["INVOICE_RELAY_DATABASE_URL"])
    assert set(actions) == set(uids.values())
    assert all(action is None for action in actions.values())
    assert len(smtp.messages) == 2  # a and b


@pytest.mark.parametrize(
    ("after", "flag", "text"), [("seen", "\\Seen", "seen"), ("flag", "\\Flagged", "flagged")]
)
def test_seen_and_flag_mark_only_settled_mail(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    *,
    after: str,
    flag: str,
    text: str,
) -> None:
    uids = edge_mailbox(imap, smtp)
    before = Snapshot.of(imap)
    env = _env(imap, smtp, smtp_ca, tmp_path, after)
    poll(env)
    first = Snapshot.of(imap)
    assert first.folders == before.folders and first.inbox == before.inbox
    for name, uid in uids.items():
        expected = {flag} if name in SETTLED else set()
        assert first.flags[uid] == frozenset(expected), name
    actions = mail_actions(env["INVOICE_RELAY_DATABASE_URL"])
    assert {uid: action for uid, action in actions.items() if action} == {
        uids[name]: text for name in SETTLED
    }
    poll(env)  # a second poll changes nothing
    assert Snapshot.of(imap) == first
    assert mail_actions(env["INVOICE_RELAY_DATABASE_URL"]) == actions


def test_move_takes_settled_mail_to_the_target_once(
    move_server: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    imap = move_server
    uids = edge_mailbox(imap, smtp)
    before = Snapshot.of(imap)
    env = _env(imap, smtp, smtp_ca, tmp_path, f"move:{TARGET}")
    database_url = env["INVOICE_RELAY_DATABASE_URL"]
    stderr = poll(env)
    how = [
        record["how"]
        for record in map(json.loads, stderr.splitlines())
        if record.get("action") == "mail_moved"
    ]
    uidplus_only = imap.announced is not None and "MOVE" not in imap.announced
    expected = "copy_expunge" if uidplus_only else "move"
    assert how == [expected] * len(SETTLED)
    first = Snapshot.of(imap)
    assert first.folders == before.folders  # nothing created
    assert first.target == tuple(sorted(_mid(name) for name in SETTLED))
    assert set(first.inbox) == {uids[name] for name in EDGE_CASES if name not in SETTLED}
    # What stays is untouched: no flag, no \Deleted left behind.
    assert all(first.flags[uid] == frozenset() for uid in first.inbox)
    actions = mail_actions(database_url)
    assert {uid: action for uid, action in actions.items() if action} == {
        uids[name]: f"moved to {TARGET}" for name in SETTLED
    }
    sightings = sql_rows(database_url, "SELECT count(*) AS n FROM sightings")

    poll(env)  # nothing new: the shortcut on UIDNEXT holds although UIDs left the folder
    assert Snapshot.of(imap) == first
    assert sql_rows(database_url, "SELECT count(*) AS n FROM sightings") == sightings

    # New mail after the move is read, forwarded and moved; nothing old is read again.
    later = imap.append(_invoice("later", ("later.pdf", samples.invoice_pdf(number="9006"))))
    poll(env)
    after_new = Snapshot.of(imap)
    assert later not in after_new.inbox
    assert after_new.target == tuple(sorted([*first.target, _mid("later")]))
    rows = sql_rows(database_url, "SELECT count(*) AS n FROM sightings")
    assert rows[0]["n"] == int(str(sightings[0]["n"])) + 1
    sent = [str(mail.message["X-Invoice-Relay"]).strip() for mail in smtp.messages]
    assert len(sent) == len(set(sent))  # nothing forwarded twice


@pytest.mark.parametrize(
    ("capabilities", "after", "problem"),
    [
        (("MOVE", "UIDPLUS"), f"move:{TARGET}", "neither MOVE nor UIDPLUS"),
        ((), "move:Missing", "'Missing' does not exist"),
    ],
)
def test_an_impossible_move_is_reported_by_check_and_poll(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    *,
    capabilities: tuple[str, ...],
    after: str,
    problem: str,
) -> None:
    if capabilities:
        imap.drop_capabilities(*capabilities)
    edge_mailbox(imap, smtp)
    before = Snapshot.of(imap)
    env = _env(imap, smtp, smtp_ca, tmp_path, after)
    checked = run_relay(env, "check")
    assert checked.returncode == 1
    assert "FAIL after-forward" in checked.stdout and problem in checked.stdout, checked.stdout
    stderr = poll(env)  # forwarding goes on; the mailbox is left as it is
    assert problem in stderr and "mail_action_impossible" in stderr
    assert len(smtp.messages) == 2
    assert Snapshot.of(imap) == before


def test_check_describes_a_possible_move(
    move_server: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    move_server.create_folder(TARGET)
    env = _env(move_server, smtp, smtp_ca, tmp_path, f"move:{TARGET}")
    checked = run_relay(env, "check")
    assert "ok   after-forward" in checked.stdout, checked.stdout
    assert ("MOVE" in checked.stdout) or ("UID EXPUNGE" in checked.stdout)


# --- crash points -------------------------------------------------------------------


def _crash(env: Mapping[str, str], point: str) -> None:
    crashed = run_relay({**env, "INVOICE_RELAY_TEST_CRASH_AT": point}, "once")
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr[-3000:]
    assert "test_crash" in crashed.stderr
    # The crashed process handed back none of its leases: the next poll waits out the
    # default lease (30 s), as a user's next run would.
    wait_for_leases(env["INVOICE_RELAY_DATABASE_URL"])


@pytest.mark.parametrize(
    ("uidplus_only", "point", "between"),
    [
        (False, "after_mark:2", False),  # forwarded and marked, no action yet
        (True, "after_copy:1", True),  # copied, not yet expunged
        (True, "after_copy:2", True),
        (False, "after_mail_action:1", False),  # moved, not yet recorded
        (True, "after_mail_action:1", False),
    ],
)
def test_a_crash_repeats_only_the_action_and_never_copies_twice(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    *,
    uidplus_only: bool,
    point: str,
    between: bool,
) -> None:
    if uidplus_only:
        imap.drop_capabilities("MOVE")
    uids = edge_mailbox(imap, smtp)
    env = _env(imap, smtp, smtp_ca, tmp_path, f"move:{TARGET}")
    _crash(env, point)
    crashed = Snapshot.of(imap)
    for name in SETTLED:
        # Never in neither folder; at worst in both.
        assert uids[name] in crashed.inbox or _mid(name) in crashed.target, name
    if between:
        assert set(crashed.target) & {_mid(name) for name in SETTLED}
    sent_before = len(smtp.messages)
    poll(env)
    done = Snapshot.of(imap)
    assert done.target == tuple(sorted(_mid(name) for name in SETTLED))  # once each
    assert set(done.inbox) == {uids[name] for name in EDGE_CASES if name not in SETTLED}
    assert all(done.flags[uid] == frozenset() for uid in done.inbox)
    # Nothing but the action was repeated: nothing forwarded again.
    sent = [str(mail.message["X-Invoice-Relay"]).strip() for mail in smtp.messages]
    assert len(sent) == len(set(sent)), point
    assert len(smtp.messages) - sent_before <= 1  # what the crash left unsent, at most
    actions = mail_actions(env["INVOICE_RELAY_DATABASE_URL"])
    assert {uid for uid, action in actions.items() if action} == {uids[n] for n in SETTLED}
    poll(env)
    assert Snapshot.of(imap) == done


def test_check_with_seen_tries_the_read_write_select(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    before = Snapshot.of(imap)
    env = _env(imap, smtp, smtp_ca, tmp_path, "seen")
    checked = run_relay(env, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok   after-forward: seen: the folder 'INBOX' can be SELECTed" in checked.stdout
    assert Snapshot.of(imap) == before
