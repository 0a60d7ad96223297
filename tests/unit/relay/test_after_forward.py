"""INVOICE_RELAY_AFTER_FORWARD: the setting, when a mail is settled, and the tidier's
order of IMAP commands and records (in-memory fakes; Dovecot in tests/integration)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.fakes import FakeMailActions, FakeMailActionStore, StoredMail
from worker.config import values
from worker.config.settings import Settings
from worker.errors import ConfigError
from worker.faults import Checkpoint, CrashPoint, no_checkpoint
from worker.models import AfterForward, DocumentState, MailActionMode, PartState, SightingKind
from worker.models import UntidiedMail as Mail
from worker.relay.settled import (
    MoveSupport,
    Settlement,
    move_problem,
    move_support,
    searchable_message_id,
    settlement,
)
from worker.relay.tidy import GONE_NOTE, UNSURE_NOTE, MailTidier, tidy_quietly

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
K = SightingKind
S = DocumentState

FORWARDED = PartState(kind=K.DOCUMENT, document_state=S.FORWARDED)
PENDING = PartState(kind=K.DOCUMENT, document_state=S.PENDING)
FAILED = PartState(kind=K.DOCUMENT, document_state=S.FAILED)
DUP_FORWARDED = PartState(kind=K.DUPLICATE, document_state=S.FORWARDED)
DUP_PENDING = PartState(kind=K.DUPLICATE, document_state=S.PENDING)
DUP_FAILED = PartState(kind=K.DUPLICATE, document_state=S.FAILED)
REJECTED = PartState(kind=K.REJECTED, document_state=None)
NO_PDF = PartState(kind=K.NO_PDF, document_state=None)
ERROR = PartState(kind=K.ERROR, document_state=None)


# --- the pure decisions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ((FORWARDED,), Settlement.SETTLED),
        ((DUP_FORWARDED,), Settlement.SETTLED),
        ((FORWARDED, REJECTED), Settlement.SETTLED),
        ((DUP_FORWARDED, FORWARDED, REJECTED), Settlement.SETTLED),
        ((PENDING,), Settlement.UNSETTLED),
        ((FORWARDED, PENDING), Settlement.UNSETTLED),
        ((FAILED,), Settlement.UNSETTLED),
        ((FORWARDED, FAILED), Settlement.UNSETTLED),
        ((DUP_PENDING,), Settlement.UNSETTLED),
        ((FORWARDED, DUP_PENDING), Settlement.UNSETTLED),
        ((DUP_FAILED,), Settlement.UNSETTLED),
        ((FORWARDED, ERROR), Settlement.UNSETTLED),
        ((ERROR,), Settlement.UNSETTLED),
        ((REJECTED,), Settlement.NOTHING_ACCEPTED),
        ((NO_PDF,), Settlement.NOTHING_ACCEPTED),
        ((REJECTED, REJECTED), Settlement.NOTHING_ACCEPTED),
        ((), Settlement.NOTHING_ACCEPTED),
    ],
)
def test_settlement(parts: tuple[PartState, ...], expected: Settlement) -> None:
    assert settlement(parts) is expected


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"IMAP4REV1", "MOVE", "UIDPLUS"}, MoveSupport.MOVE),
        ({"IMAP4REV1", "MOVE"}, MoveSupport.MOVE),
        ({"IMAP4REV1", "UIDPLUS"}, MoveSupport.COPY_EXPUNGE),
        ({"IMAP4REV1"}, MoveSupport.NONE),
    ],
)
def test_move_support(capabilities: set[str], expected: MoveSupport) -> None:
    assert move_support(frozenset(capabilities)) is expected


@pytest.mark.parametrize(
    ("support", "exists", "problem"),
    [
        (MoveSupport.MOVE, True, None),
        (MoveSupport.COPY_EXPUNGE, True, None),
        (MoveSupport.MOVE, False, "the folder 'Done' does not exist"),
        (MoveSupport.NONE, True, "neither MOVE nor UIDPLUS"),
        (MoveSupport.NONE, False, "neither MOVE nor UIDPLUS"),
    ],
)
def test_move_problem(support: MoveSupport, exists: bool, problem: str | None) -> None:
    found = move_problem(support, folder="Done", folder_exists=exists)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("message_id", "searchable"),
    [
        ("<invoice-1@shop.example>", True),
        ("", False),
        ("<a b@shop.example>", False),
        ('<a"b@shop.example>', False),
        ("<a\\b@shop.example>", False),
        ("<rechnung-ü@shop.example>", False),
        ("<a\r\nb@x>", False),
    ],
)
def test_searchable_message_id(message_id: str, searchable: bool) -> None:
    assert searchable_message_id(message_id) is searchable


# --- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "folder"),
    [
        ("keep", MailActionMode.KEEP, None),
        ("KEEP", MailActionMode.KEEP, None),
        ("seen", MailActionMode.SEEN, None),
        (" flag ", MailActionMode.FLAG, None),
        ("move:Archive", MailActionMode.MOVE, "Archive"),
        ("MOVE:INBOX/Done", MailActionMode.MOVE, "INBOX/Done"),
        ("move:Rechnungen erledigt", MailActionMode.MOVE, "Rechnungen erledigt"),
        ("move:a:b", MailActionMode.MOVE, "a:b"),
    ],
)
def test_after_forward_values(text: str, mode: MailActionMode, folder: str | None) -> None:
    parsed = values.after_forward(text)
    assert parsed == AfterForward(mode=mode, folder=folder)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("move", "move needs a folder"),
        ("move:", "move needs a folder"),
        ("move:   ", "move needs a folder"),
        ("move:a\tb", "control characters"),
        ("seen:Archive", "only move takes a folder"),
        ("delete", "is not one of keep, seen, flag, move:FOLDER"),
        ("", "is not one of"),
    ],
)
def test_after_forward_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        values.after_forward(text)


BASE_ENV = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example.test",
    "INVOICE_RELAY_IMAP_USER": "u",
    "INVOICE_RELAY_IMAP_PASSWORD": "p",
    "INVOICE_RELAY_SMTP_HOST": "smtp.example.test",
    "INVOICE_RELAY_FORWARD_TO": "to@example.test",
    "INVOICE_RELAY_FORWARD_FROM": "from@example.test",
    "INVOICE_RELAY_DATABASE_URL": "sqlite:////tmp/unused.db",
}


def test_the_setting_defaults_to_keep_and_is_read_once() -> None:
    assert Settings.from_env(BASE_ENV).after_forward == AfterForward()
    assert not AfterForward().changes_mailbox
    moved = Settings.from_env({**BASE_ENV, "INVOICE_RELAY_AFTER_FORWARD": "move:Done"})
    assert moved.after_forward == AfterForward(mode=MailActionMode.MOVE, folder="Done")
    assert moved.describe()["after_forward"] == "move:Done"
    with pytest.raises(ConfigError, match="INVOICE_RELAY_AFTER_FORWARD: move needs a folder"):
        Settings.from_env({**BASE_ENV, "INVOICE_RELAY_AFTER_FORWARD": "move:"})


@pytest.mark.parametrize(
    ("after", "text"),
    [
        (AfterForward(mode=MailActionMode.SEEN), "seen"),
        (AfterForward(mode=MailActionMode.FLAG), "flagged"),
        (AfterForward(mode=MailActionMode.MOVE, folder="Done"), "moved to Done"),
    ],
)
def test_the_audit_text(after: AfterForward, text: str) -> None:
    assert after.done_text == text


def test_a_folder_belongs_to_move_only() -> None:
    with pytest.raises(ValueError, match="only for move"):
        AfterForward(mode=MailActionMode.SEEN, folder="Done")
    with pytest.raises(ValueError, match="needed for move"):
        AfterForward(mode=MailActionMode.MOVE)


# --- the tidier, over fakes -----------------------------------------------------------


class Crash(Exception):
    """Stands in for the process ending at a crash point."""


def crash_at(point: CrashPoint, nth: int = 1) -> Checkpoint:
    reached = {"count": 0}

    def checkpoint(at: CrashPoint) -> None:
        if at is point:
            reached["count"] += 1
            if reached["count"] == nth:
                raise Crash(point.value)

    return checkpoint


def folders(*uids: int) -> dict[str, dict[int, StoredMail]]:
    inbox = {uid: StoredMail(message_id=f"<m{uid}@shop.example>", flags=set()) for uid in uids}
    return {"INBOX": inbox, "Done": {}}


def mails(**parts: tuple[PartState, ...]) -> list[Mail]:
    """uid "u3" -> Mail(uid=3, ...)."""
    return [
        Mail(uid=int(name[1:]), message_id=f"<m{name[1:]}@shop.example>", parts=value)
        for name, value in parts.items()
    ]


def tidier(
    after: AfterForward,
    actions: FakeMailActions,
    store: FakeMailActionStore,
    checkpoint: Checkpoint = no_checkpoint,
) -> MailTidier:
    return MailTidier(
        after=after,
        mailbox="u@h/INBOX",
        actions=actions,
        store=store,
        clock=lambda: T0,
        checkpoint=checkpoint,
    )


MOVE = AfterForward(mode=MailActionMode.MOVE, folder="Done")
SEEN = AfterForward(mode=MailActionMode.SEEN)
FLAG = AfterForward(mode=MailActionMode.FLAG)

EDGE = {
    "u1": (FORWARDED,),
    "u2": (DUP_FORWARDED,),
    "u3": (FORWARDED, REJECTED),
    "u4": (FORWARDED, PENDING),
    "u5": (FAILED, DUP_FORWARDED),
    "u6": (DUP_PENDING,),
    "u7": (FORWARDED, ERROR),
}
SETTLED_UIDS = {1, 2, 3}


def test_keep_opens_nothing() -> None:
    actions = FakeMailActions(folders(1))
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    assert tidier(AfterForward(), actions, store).tidy(1).acted == 0
    assert actions.log == []
    assert store.states == {}


def test_nothing_settled_opens_no_session() -> None:
    actions = FakeMailActions(folders(4, 6))
    store = FakeMailActionStore(mails(u4=(FORWARDED, PENDING), u6=(DUP_PENDING,)))
    assert tidier(SEEN, actions, store).tidy(1).acted == 0
    assert actions.log == []


@pytest.mark.parametrize(("after", "flag"), [(SEEN, "\\Seen"), (FLAG, "\\Flagged")])
def test_seen_and_flag_mark_only_settled_mail(after: AfterForward, flag: str) -> None:
    actions = FakeMailActions(folders(*range(1, 8)))
    store = FakeMailActionStore(mails(**EDGE))
    report = tidier(after, actions, store).tidy(1)
    assert report.acted == 3
    flagged = {uid for uid, mail in actions.folders["INBOX"].items() if mail.flags}
    assert flagged == SETTLED_UIDS
    assert all(mail.flags == {flag} for mail in actions.folders["INBOX"].values() if mail.flags)
    assert store.states == {uid: ("done", after.done_text, None) for uid in SETTLED_UIDS}
    assert actions.log.count("STORE") == 1  # one STORE for all of them
    # A second run finds nothing to do.
    assert tidier(after, actions, store).tidy(1).acted == 0


@pytest.mark.parametrize(
    ("capabilities", "commands"),
    [
        (("MOVE", "UIDPLUS"), ["MOVE"]),
        (("UIDPLUS",), ["COPY", "UID EXPUNGE"]),
    ],
)
def test_move_takes_settled_mail_to_the_target(
    capabilities: tuple[str, ...], commands: list[str]
) -> None:
    actions = FakeMailActions(folders(*range(1, 8)), capabilities=capabilities)
    store = FakeMailActionStore(mails(**EDGE))
    assert tidier(MOVE, actions, store).tidy(1).acted == 3
    assert set(actions.folders["INBOX"]) == {4, 5, 6, 7}
    moved = sorted(mail.message_id for mail in actions.folders["Done"].values())
    assert moved == ["<m1@shop.example>", "<m2@shop.example>", "<m3@shop.example>"]
    assert store.states == {uid: ("done", "moved to Done", None) for uid in SETTLED_UIDS}
    sent = [command for command in actions.log if command in ("MOVE", "COPY", "UID EXPUNGE")]
    assert sent == commands * 3
    assert tidier(MOVE, actions, store).tidy(1).acted == 0
    assert len(actions.folders["Done"]) == 3


@pytest.mark.parametrize(
    ("capabilities", "target", "problem"),
    [
        (("IMAP4REV1",), "Done", "neither MOVE nor UIDPLUS"),
        (("MOVE", "UIDPLUS"), "Missing", "'Missing' does not exist"),
    ],
)
def test_an_impossible_move_is_reported_and_changes_nothing(
    capabilities: tuple[str, ...], target: str, problem: str
) -> None:
    actions = FakeMailActions(folders(1), capabilities=capabilities)
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    after = AfterForward(mode=MailActionMode.MOVE, folder=target)
    report = tidier(after, actions, store).tidy(1)
    assert report.problem is not None and problem in report.problem
    assert report.acted == 0
    assert set(actions.folders) == {"INBOX", "Done"}  # nothing created
    assert set(actions.folders["INBOX"]) == {1}
    assert store.states == {}


def test_a_mail_that_left_the_folder_is_skipped_once() -> None:
    actions = FakeMailActions(folders(2))
    store = FakeMailActionStore(mails(u1=(FORWARDED,), u2=(FORWARDED,)))
    assert tidier(MOVE, actions, store).tidy(1).acted == 1
    assert store.states[1] == ("skipped", None, GONE_NOTE)
    assert store.states[2] == ("done", "moved to Done", None)


def test_a_renumbered_folder_is_left_to_the_next_poll() -> None:
    actions = FakeMailActions(folders(1), uidvalidity=2)
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    assert tidier(SEEN, actions, store).tidy(1).acted == 0
    assert actions.log == ["SELECT"]
    assert store.states == {}


def test_a_crash_after_the_flag_repeats_only_the_flag() -> None:
    actions = FakeMailActions(folders(1))
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    with pytest.raises(Crash):
        tidier(SEEN, actions, store, crash_at(CrashPoint.AFTER_MAIL_ACTION)).tidy(1)
    assert store.states == {}
    assert tidier(SEEN, actions, store).tidy(1).acted == 1
    assert actions.folders["INBOX"][1].flags == {"\\Seen"}
    assert store.states[1] == ("done", "seen", None)


def test_a_crash_between_copy_and_expunge_leaves_one_copy_in_the_target() -> None:
    actions = FakeMailActions(folders(1, 2), capabilities=("UIDPLUS",))
    store = FakeMailActionStore(mails(u1=(FORWARDED,), u2=(FORWARDED,)))
    with pytest.raises(Crash):
        tidier(MOVE, actions, store, crash_at(CrashPoint.AFTER_COPY)).tidy(1)
    # At worst in both folders, never in neither.
    assert set(actions.folders["INBOX"]) == {1, 2}
    assert len(actions.folders["Done"]) == 1
    assert store.states.get(1) == ("copying", None, None)
    actions.log.clear()
    assert tidier(MOVE, actions, store).tidy(1).acted == 2
    assert set(actions.folders["INBOX"]) == set()
    moved = sorted(mail.message_id for mail in actions.folders["Done"].values())
    assert moved == ["<m1@shop.example>", "<m2@shop.example>"]  # uid 1 not copied twice
    assert actions.log.count("COPY") == 1  # only uid 2's
    assert store.states[1] == ("done", "moved to Done", None)


@pytest.mark.parametrize("capabilities", [("MOVE", "UIDPLUS"), ("UIDPLUS",)])
def test_a_crash_after_the_move_records_it_without_copying_again(
    capabilities: tuple[str, ...],
) -> None:
    actions = FakeMailActions(folders(1), capabilities=capabilities)
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    with pytest.raises(Crash):
        tidier(MOVE, actions, store, crash_at(CrashPoint.AFTER_MAIL_ACTION)).tidy(1)
    assert actions.folders["INBOX"] == {}
    actions.log.clear()
    assert tidier(MOVE, actions, store).tidy(1).acted == 1
    assert len(actions.folders["Done"]) == 1
    assert not {"MOVE", "COPY"} & set(actions.log)
    assert store.states[1] == ("done", "moved to Done", None)


def test_a_copy_that_never_went_out_is_made_after_looking() -> None:
    actions = FakeMailActions(folders(1), capabilities=("UIDPLUS",))
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    store.start_copy(mailbox="m", uidvalidity=1, uid=1, now=T0)  # crashed before COPY
    assert tidier(MOVE, actions, store).tidy(1).acted == 1
    assert actions.log.index("SEARCH TARGET") < actions.log.index("COPY")
    assert len(actions.folders["Done"]) == 1
    assert actions.folders["INBOX"] == {}


def test_without_a_message_id_an_unsure_copy_is_not_repeated() -> None:
    actions = FakeMailActions(
        {"INBOX": {1: StoredMail(message_id="", flags=set())}, "Done": {}},
        capabilities=("UIDPLUS",),
    )
    store = FakeMailActionStore([Mail(uid=1, message_id="", parts=(FORWARDED,))])
    store.start_copy(mailbox="m", uidvalidity=1, uid=1, now=T0)
    assert tidier(MOVE, actions, store).tidy(1).acted == 0
    assert set(actions.folders["INBOX"]) == {1}
    assert actions.folders["Done"] == {}
    assert store.states[1] == ("skipped", None, UNSURE_NOTE)


def test_an_imap_failure_after_forwarding_is_reported_not_raised() -> None:
    actions = FakeMailActions(folders(1), fail_on="STORE")
    store = FakeMailActionStore(mails(u1=(FORWARDED,)))
    report = tidy_quietly(tidier(SEEN, actions, store), 1)
    assert report.problem is not None and "STORE failed" in report.problem
    assert store.states == {}
    assert not actions.opened  # the session was closed
