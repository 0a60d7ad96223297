"""worker.imap.mailbox.ImapMailbox against a real Dovecot on loopback."""

from __future__ import annotations

import base64
import logging
import re
import socket
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from tests import samples
from tests.servers.bare_imap import running_bare_imap
from tests.servers.dovecot import DovecotServer, free_port, running_dovecot
from worker.config.environment import Secret
from worker.errors import (
    MailboxError,
    MailboxFolderError,
    MailboxLoginError,
    MailboxLoginUnsupported,
)
from worker.imap.mailbox import ImapMailbox
from worker.mail import mime
from worker.mail.ranged import fetch_decoded
from worker.models import BodyPart, PasswordCredentials, Security

pytestmark = pytest.mark.integration

OpenMailbox = Callable[..., ImapMailbox]

_SENT = re.compile(r"^> b'\w+ (UID \w+|\w+)")


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    with running_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture
def folder(dovecot: DovecotServer) -> str:
    """A fresh folder per test, so tests sharing the server do not see each other's mail."""
    name = f"Test-{uuid.uuid4().hex[:12]}"
    dovecot.create_folder(name)
    return name


@pytest.fixture
def connect(dovecot: DovecotServer, folder: str) -> Iterator[OpenMailbox]:
    """Build an ImapMailbox on the test's folder (TLS by default); closed at teardown."""
    opened: list[ImapMailbox] = []

    def build(**overrides: Any) -> ImapMailbox:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": dovecot.tls_port,
            "security": Security.SSL,
            "user": dovecot.user,
            "password": dovecot.password,
            "folder": folder,
            "ca_file": dovecot.ca_file,
            "timeout": 10.0,
        }
        settings.update(overrides)
        user, password = settings.pop("user"), settings.pop("password")
        settings["credentials"] = PasswordCredentials(user=user, password=Secret(password))
        mailbox = ImapMailbox(**settings)
        opened.append(mailbox)
        return mailbox

    yield build
    for mailbox in opened:
        mailbox.close()


def _commands(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The IMAP commands imapclient sent, from its debug log (passwords are redacted there)."""
    sent = (_SENT.match(record.getMessage()) for record in caplog.records)
    return [match.group(1) for match in sent if match]


def _pdf_parts(part: BodyPart) -> list[BodyPart]:
    found = [part] if part.content_type == "application/pdf" else []
    for child in part.children:
        found += _pdf_parts(child)
    return found


# --- opening -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("security", "expected_commands"),
    [
        (Security.NONE, ["LOGIN", "EXAMINE", "LOGOUT"]),
        # imaplib asks for CAPABILITY again after STARTTLS, as RFC 3501 requires.
        (Security.STARTTLS, ["STARTTLS", "CAPABILITY", "LOGIN", "EXAMINE", "LOGOUT"]),
        (Security.SSL, ["LOGIN", "EXAMINE", "LOGOUT"]),
    ],
)
def test_open_reports_the_folder_status_in_few_commands(
    dovecot: DovecotServer,
    connect: OpenMailbox,
    caplog: pytest.LogCaptureFixture,
    security: Security,
    expected_commands: list[str],
) -> None:
    port = dovecot.tls_port if security is Security.SSL else dovecot.port
    mailbox = connect(security=security, port=port)
    uids = dovecot.append_many([samples.plain_mail(), samples.plain_mail()], folder=mailbox.folder)
    caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")

    status = mailbox.open()
    mailbox.close()

    assert status.uidvalidity == dovecot.uidvalidity(mailbox.folder)
    assert status.uidnext == max(uids) + 1
    assert status.exists == 2
    assert _commands(caplog) == expected_commands


def test_ssl_without_the_ca_file_is_refused_naming_the_certificate(connect: OpenMailbox) -> None:
    mailbox = connect(ca_file=None)

    with pytest.raises(MailboxError, match="certificate not trusted") as caught:
        mailbox.open()

    assert not isinstance(caught.value, MailboxLoginError)
    assert "INVOICE_RELAY_CA_FILE" in str(caught.value)
    assert caught.value.__cause__ is not None


def test_starttls_checks_the_certificate_too(dovecot: DovecotServer, connect: OpenMailbox) -> None:
    mailbox = connect(security=Security.STARTTLS, port=dovecot.port, ca_file=None)

    with pytest.raises(MailboxError, match="certificate not trusted"):
        mailbox.open()


def test_wrong_password_is_a_login_error_without_the_password(
    dovecot: DovecotServer, connect: OpenMailbox
) -> None:
    wrong = "wrong-" + dovecot.password
    mailbox = connect(password=wrong)

    with pytest.raises(MailboxLoginError) as caught:
        mailbox.open()

    message = str(caught.value)
    assert wrong not in message
    assert dovecot.password not in message
    assert f"{dovecot.host}:{dovecot.tls_port}" in message
    assert wrong not in repr(mailbox)


def test_missing_folder_is_a_folder_error(connect: OpenMailbox) -> None:
    mailbox = connect(folder="No-Such-Folder")

    with pytest.raises(MailboxFolderError, match="No-Such-Folder"):
        mailbox.open()


@pytest.mark.parametrize("security", [Security.NONE, Security.SSL])
def test_unreachable_port_is_a_mailbox_error(connect: OpenMailbox, security: Security) -> None:
    port = free_port()  # nothing listens there
    mailbox = connect(security=security, port=port)

    with pytest.raises(MailboxError, match=f"127.0.0.1:{port}") as caught:
        mailbox.open()

    assert type(caught.value) is MailboxError
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize("security", [Security.NONE, Security.SSL])
def test_silent_server_times_out(connect: OpenMailbox, security: Security) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel accepts; nobody ever greets or answers the handshake
        mailbox = connect(security=security, port=listener.getsockname()[1], timeout=0.3)

        with pytest.raises(MailboxError, match="timed out") as caught:
            mailbox.open()

    assert isinstance(caught.value.__cause__, TimeoutError)


def test_server_going_away_mid_session_is_a_mailbox_error(
    dovecot: DovecotServer, connect: OpenMailbox
) -> None:
    mailbox = connect()
    mailbox.open()
    dovecot.stop()
    try:
        with pytest.raises(MailboxError):
            mailbox.new_uids(0, None)
    finally:
        dovecot.start()
    assert mailbox.open().exists == 0  # the same ports serve again after the restart


# --- reading -----------------------------------------------------------------------


def test_new_uids_are_incremental_and_ignore_the_star_quirk(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    first = dovecot.append_many([samples.plain_mail(), samples.plain_mail()], folder=folder)
    mailbox = connect()
    mailbox.open()

    assert mailbox.new_uids(0, None) == first
    # `UID n:*` with n past the last UID still matches the last mail: it must not come back.
    assert mailbox.new_uids(first[-1], None) == []
    assert mailbox.new_uids(first[-1] + 100, None) == []

    later = dovecot.append(samples.plain_mail(), folder=folder)
    mailbox.open()
    assert mailbox.new_uids(first[-1], None) == [later]
    assert mailbox.new_uids(first[0], None) == [first[1], later]


def test_new_uids_since_leaves_older_mail_alone(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    old = dovecot.append(
        samples.plain_mail(), folder=folder, internaldate=datetime(2024, 1, 10, 12, tzinfo=UTC)
    )
    new = dovecot.append(
        samples.plain_mail(), folder=folder, internaldate=datetime(2024, 6, 10, 12, tzinfo=UTC)
    )
    mailbox = connect()
    mailbox.open()

    assert mailbox.new_uids(0, date(2024, 3, 1)) == [new]
    assert mailbox.new_uids(0, None) == [old, new]


def test_summaries_describe_a_real_invoice_mail(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    pdf = samples.invoice_pdf(number="1042")
    raw = samples.invoice_mail(
        pdfs=[("Rechnung 1042.pdf", pdf)], subject="Rechnung 1042", message_id="<r1042@shop>"
    )
    received = datetime(2024, 5, 6, 11, 30, 5, tzinfo=UTC)
    uid = dovecot.append(raw, folder=folder, internaldate=received)
    plain_uid = dovecot.append(samples.plain_mail(), folder=folder)
    mailbox = connect()
    mailbox.open()

    summaries = mailbox.summaries([plain_uid, uid, plain_uid + 50])

    assert [summary.uid for summary in summaries] == [uid, plain_uid]
    invoice = summaries[0]
    assert invoice.size == len(raw)
    assert invoice.internaldate == received
    assert invoice.headers.subject == "Rechnung 1042"
    assert invoice.headers.message_id == "<r1042@shop>"
    assert invoice.headers.sender_address == "invoices@shop.example"
    assert invoice.structure is not None
    [pdf_part] = _pdf_parts(invoice.structure)
    assert pdf_part.disposition_params.get("filename") == "Rechnung 1042.pdf"
    assert pdf_part.encoding == "base64"
    assert summaries[1].structure is not None
    assert _pdf_parts(summaries[1].structure) == []


def test_summaries_are_fetched_in_batches(
    dovecot: DovecotServer,
    folder: str,
    connect: OpenMailbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uids = dovecot.append_many([samples.plain_mail() for _ in range(5)], folder=folder)
    mailbox = connect(batch_size=2)
    mailbox.open()
    caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")

    summaries = mailbox.summaries(uids)

    assert [summary.uid for summary in summaries] == uids
    assert _commands(caplog).count("UID FETCH") == 3


def test_fetch_sections_returns_the_attachment_and_probes(
    dovecot: DovecotServer,
    folder: str,
    connect: OpenMailbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pdfs = [samples.invoice_pdf(number=str(number)) for number in (1042, 1043, 1044)]
    uids = dovecot.append_many(
        [samples.invoice_mail(pdfs=[(f"Rechnung {n}.pdf", pdf)]) for n, pdf in enumerate(pdfs)],
        folder=folder,
    )
    mailbox = connect()
    mailbox.open()
    [summary] = mailbox.summaries([uids[0]])
    assert summary.structure is not None
    section = _pdf_parts(summary.structure)[0].section
    caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")

    probes = mailbox.fetch_sections({uid: [section] for uid in uids}, max_bytes=8)
    bodies = mailbox.fetch_sections({uid: [section, "1"] for uid in uids})

    assert {key: len(value) for key, value in probes.items()} == {(uid, section): 8 for uid in uids}
    assert base64.b64decode(probes[(uids[0], section)])[:5] == b"%PDF-"
    assert [base64.b64decode(bodies[(uid, section)]) for uid in uids] == pdfs
    assert set(bodies) == {(uid, part) for uid in uids for part in (section, "1")}
    # Mails wanting the same sections share one command.
    assert _commands(caplog).count("UID FETCH") == 2


def test_fetch_range_reads_a_part_piece_by_piece(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    pdf = samples.invoice_pdf(number="2001")
    [uid] = dovecot.append_many([samples.invoice_mail(pdfs=[("a.pdf", pdf)])], folder=folder)
    mailbox = connect()
    mailbox.open()
    [summary] = mailbox.summaries([uid])
    assert summary.structure is not None
    section = _pdf_parts(summary.structure)[0].section
    whole = mailbox.fetch_sections({uid: [section]})[(uid, section)]

    pieces = [
        mailbox.fetch_range(uid, section, offset=offset, length=1000)
        for offset in range(0, len(whole) + 1000, 1000)
    ]

    assert b"".join(piece or b"" for piece in pieces) == whole
    assert pieces[-1] == b""  # past the end: empty, not absent
    assert fetch_decoded(mailbox, uid, section, range_bytes=4096) == pdf
    assert mailbox.fetch_range(uid + 1, section, offset=0, length=10) is None


def test_reading_changes_no_flag(dovecot: DovecotServer, folder: str, connect: OpenMailbox) -> None:
    raw = samples.invoice_mail(pdfs=[("a.pdf", samples.invoice_pdf())])
    uid = dovecot.append(raw, folder=folder, flags=[r"\Flagged"])
    before = dovecot.flags(uid, folder)
    mailbox = connect()
    mailbox.open()

    mailbox.new_uids(0, None)
    assert [summary.uid for summary in mailbox.summaries([uid])] == [uid]
    mailbox.fetch_sections({uid: ["1", "2"]})
    mailbox.fetch_sections({uid: ["2"]}, max_bytes=16)
    mailbox.close()

    assert before == {r"\Flagged"}
    assert dovecot.flags(uid, folder) == before


def test_mail_deleted_between_summaries_and_fetch_is_absent(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    pdf = samples.invoice_pdf()
    kept, gone = dovecot.append_many(
        [samples.invoice_mail(pdfs=[("a.pdf", pdf)]) for _ in range(2)], folder=folder
    )
    mailbox = connect()
    mailbox.open()
    assert [summary.uid for summary in mailbox.summaries([kept, gone])] == [kept, gone]

    dovecot.delete_uids([gone], folder)
    fetched = mailbox.fetch_sections({kept: ["2"], gone: ["2"]})

    assert list(fetched) == [(kept, "2")]
    assert base64.b64decode(fetched[(kept, "2")]) == pdf
    assert [summary.uid for summary in mailbox.summaries([kept, gone])] == [kept]


def test_new_uidvalidity_after_the_folder_is_recreated(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    dovecot.append(samples.plain_mail(), folder=folder)
    mailbox = connect()
    before = mailbox.open()

    after_uidvalidity = dovecot.recreate_folder(folder)

    status = mailbox.open()
    assert status.uidvalidity == after_uidvalidity != before.uidvalidity
    assert status.exists == 0


def test_not_opened_is_a_mailbox_error(connect: OpenMailbox) -> None:
    with pytest.raises(MailboxError, match="open"):
        connect().new_uids(0, None)


def test_plain_server_without_tls(tmp_path: Path) -> None:
    with running_dovecot(tmp_path, tls=False) as server:
        assert server.tls_port is None
        assert server.ca_file is None
        mailbox = ImapMailbox(
            host=server.host,
            port=server.port,
            security=Security.NONE,
            credentials=PasswordCredentials(user=server.user, password=Secret(server.password)),
        )
        try:
            assert mailbox.open().exists == 0
        finally:
            mailbox.close()


def test_pdf_parts_cut_from_the_whole_mail_are_the_servers_bytes(
    dovecot: DovecotServer, folder: str, connect: OpenMailbox
) -> None:
    # With DKIM on, the relay takes a PDF from the whole mail it fetched for the proof
    # (worker.mail.mime.section_bodies): the cut must be exactly Dovecot's BODY[section].
    pdf = samples.invoice_pdf(number="CUT-1")
    mails = [
        samples.invoice_mail(pdfs=[("a.pdf", pdf)]),
        samples.invoice_mail(pdfs=[("a.pdf", pdf), ("b.pdf", b"%PDF-1.4 small")]),
        samples.forwarded_mail(samples.invoice_mail(pdfs=[("a.pdf", pdf)])),
        samples.unnamed_pdf_mail(pdf),
    ]
    for raw in mails:
        dovecot.append(raw, folder=folder)
    mailbox = connect()
    mailbox.open()
    uids = mailbox.new_uids(0, None)
    wholes = mailbox.fetch_messages(uids)
    checked = 0
    for summary in mailbox.summaries(uids):
        assert summary.structure is not None
        sizes = {c.section: c.size for c in mime.find_candidates(summary.structure)}
        served = mailbox.fetch_sections({summary.uid: list(sizes)})
        cut = mime.section_bodies(wholes[summary.uid], sizes)
        assert cut == {section: served[(summary.uid, section)] for section in sizes}
        checked += len(cut)
    assert checked >= len(mails)


# --- passwords that LOGIN cannot carry ---------------------------------------------------

UTF8_PASSWORD = "pässwörd-€-imap"


@pytest.fixture(scope="module")
def utf8_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    """A Dovecot whose account has a non-ASCII password (its greeting offers AUTH=PLAIN)."""
    with running_dovecot(
        tmp_path_factory.mktemp("dovecot-utf8"), tls=False, password=UTF8_PASSWORD
    ) as server:
        yield server


def utf8_mailbox(server: DovecotServer, password: str) -> ImapMailbox:
    return ImapMailbox(
        host=server.host,
        port=server.port,
        security=Security.NONE,
        credentials=PasswordCredentials(user=server.user, password=Secret(password)),
        timeout=10.0,
    )


def secret_characters_in(text: str, secret: str) -> set[str]:
    """The characters of `secret` that no ASCII setting name or message would hold."""
    return {char for char in secret if not char.isascii() and char in text}


def test_a_utf8_password_logs_in_with_authenticate_plain(
    utf8_dovecot: DovecotServer, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox = utf8_mailbox(utf8_dovecot, UTF8_PASSWORD)
    caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")
    try:
        status = mailbox.open()
    finally:
        mailbox.close()

    assert status.exists == 0
    assert _commands(caplog) == ["AUTHENTICATE", "EXAMINE", "LOGOUT"]
    plain = f"\0{utf8_dovecot.user}\0{UTF8_PASSWORD}".encode()
    assert base64.b64encode(plain).decode() not in caplog.text
    assert secret_characters_in(caplog.text, UTF8_PASSWORD) == set()


def test_a_wrong_utf8_password_is_a_login_error_without_a_character_of_it(
    utf8_dovecot: DovecotServer,
) -> None:
    wrong = "wröng-" + UTF8_PASSWORD
    mailbox = utf8_mailbox(utf8_dovecot, wrong)

    with pytest.raises(MailboxLoginError, match="login refused") as caught:
        mailbox.open()

    told = "".join(traceback.format_exception(caught.value))
    assert secret_characters_in(told, wrong) == set()
    assert wrong not in told
    assert f"{utf8_dovecot.host}:{utf8_dovecot.port}" in str(caught.value)


def test_a_utf8_password_without_authenticate_plain_is_refused_before_the_server_is_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # LOGIN is all this server offers (no AUTH=PLAIN in its greeting): it cannot carry
    # UTF-8, so the relay says so instead of "the server refused the login".
    with running_dovecot(tmp_path, tls=False, password=UTF8_PASSWORD, mechanisms="login") as server:
        mailbox = utf8_mailbox(server, UTF8_PASSWORD)
        caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")
        with pytest.raises(
            MailboxLoginUnsupported, match="does not offer AUTHENTICATE PLAIN"
        ) as caught:
            mailbox.open()

    told = "".join(traceback.format_exception(caught.value))
    assert secret_characters_in(told, UTF8_PASSWORD) == set()
    assert f"{server.host}:{server.port}" in str(caught.value)
    assert "LOGIN" not in _commands(caplog)


# --- what a poll costs ---------------------------------------------------------------------


def test_dovecot_is_never_asked_for_capability_its_greeting_lists(
    dovecot: DovecotServer, connect: OpenMailbox, caplog: pytest.LogCaptureFixture
) -> None:
    # The debug log shows the commands sent while connecting too.
    mailbox = connect(security=Security.NONE, port=dovecot.port)
    caplog.set_level(logging.DEBUG, logger="imapclient.imaplib")
    mailbox.open()
    mailbox.close()
    assert "CAPABILITY" not in _commands(caplog)


@pytest.mark.parametrize(
    ("greeting_capabilities", "uidnext_in_examine", "expected_commands"),
    [
        (True, True, ["LOGIN", "EXAMINE", "LOGOUT"]),  # Dovecot, Cyrus
        (False, True, ["CAPABILITY", "LOGIN", "EXAMINE", "LOGOUT"]),
        (True, False, ["LOGIN", "EXAMINE", "STATUS", "LOGOUT"]),  # Courier
        (False, False, ["CAPABILITY", "LOGIN", "EXAMINE", "STATUS", "LOGOUT"]),
    ],
)
def test_what_an_empty_poll_costs_by_server_class(
    greeting_capabilities: bool, uidnext_in_examine: bool, expected_commands: list[str]
) -> None:
    with running_bare_imap(
        greeting_capabilities=greeting_capabilities, uidnext_in_examine=uidnext_in_examine
    ) as bare:
        mailbox = ImapMailbox(
            host=bare.host,
            port=bare.port,
            security=Security.NONE,
            credentials=PasswordCredentials(user="invoices", password=Secret("secret")),
            timeout=10.0,
        )
        status = mailbox.open()
        mailbox.close()
        # Counted by the server itself.
        assert bare.commands == expected_commands
    assert (status.uidvalidity, status.uidnext, status.exists) == (7, 1, 0)
