"""How each adapter logs in with a user and password, and that neither prints them."""

from __future__ import annotations

import pytest

from worker.config.environment import Secret
from worker.delivery.session import SMTPLIB_CHOICE, login_mechanism
from worker.imap.session import AUTHENTICATE_PLAIN, LOGIN, login_command
from worker.models import PasswordCredentials

UTF8 = "pässwörd"


@pytest.mark.parametrize(
    ("user", "password", "capabilities", "expected"),
    [
        ("invoices", "secret", [b"IMAP4rev1", b"AUTH=PLAIN"], LOGIN),
        ("invoices", "secret", [b"IMAP4rev1"], LOGIN),  # as before: LOGIN for ASCII
        ("invoices", UTF8, [b"IMAP4rev1", b"AUTH=PLAIN"], AUTHENTICATE_PLAIN),
        ("invoices", UTF8, [b"IMAP4REV1", b"auth=plain"], AUTHENTICATE_PLAIN),
        ("rechnungen@bäckerei.example", "secret", [b"AUTH=PLAIN"], AUTHENTICATE_PLAIN),
        ("invoices", UTF8, [b"IMAP4rev1", b"AUTH=LOGIN", b"AUTH=CRAM-MD5"], None),
        ("invoices", UTF8, [], None),
    ],
)
def test_imap_login_command(
    user: str, password: str, capabilities: list[bytes], expected: str | None
) -> None:
    assert login_command(user, password, capabilities) == expected


@pytest.mark.parametrize(
    ("user", "password", "offered", "expected"),
    [
        ("relay", "secret", ["CRAM-MD5", "PLAIN", "LOGIN"], SMTPLIB_CHOICE),
        ("relay", "secret", ["LOGIN"], SMTPLIB_CHOICE),
        ("relay", UTF8, ["LOGIN", "PLAIN"], "PLAIN"),
        ("relay", UTF8, ["login", "plain"], "PLAIN"),
        ("rechnungen@bäckerei.example", "secret", ["PLAIN"], "PLAIN"),
        ("relay", UTF8, ["LOGIN", "CRAM-MD5"], None),
        ("relay", UTF8, [], None),
    ],
)
def test_smtp_login_mechanism(
    user: str, password: str, offered: list[str], expected: str | None
) -> None:
    assert login_mechanism(user, password, offered) == expected


def test_password_credentials_never_print_the_password() -> None:
    credentials = PasswordCredentials(user="invoices", password=Secret(UTF8))
    assert UTF8 not in repr(credentials)
    assert UTF8 not in str(credentials)
    assert "invoices" in repr(credentials)
    assert credentials.password.reveal() == UTF8
