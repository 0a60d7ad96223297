"""The IMAP connection below `worker.imap.mailbox`: fewer round trips, and logins that
carry UTF-8.

imaplib asks for CAPABILITY on every connection, even when the greeting listed them
(`* OK [CAPABILITY IMAP4rev1 ...]`, as Dovecot's and Cyrus's do); here it is asked only
when the greeting did not, and again after STARTTLS, as RFC 3501 requires.
"""

from __future__ import annotations

import imaplib
import logging
from collections.abc import Collection
from typing import Any

from imapclient import (  # type: ignore[import-untyped,unused-ignore]
    IMAPClient,  # type: ignore[import-untyped,unused-ignore]
    imap4,
    tls,
)
from imapclient.imapclient import (  # type: ignore[import-untyped,unused-ignore]
    IMAPlibLoggerAdapter,
)


class _GreetedCapabilities:
    """Takes the capabilities from the greeting's response code when it has them."""

    untagged_responses: dict[str, list[Any]]
    capabilities: tuple[str, ...]
    debug: int
    _mesg: Any

    def _connect(self) -> None:
        # imapclient hooks its logger in only after connecting; hooked in before, the
        # debug log shows every command, the first CAPABILITY too.
        self.debug = 5
        self._mesg = IMAPlibLoggerAdapter(logging.getLogger("imapclient.imaplib"), {}).debug
        super()._connect()  # type: ignore[misc]

    def _get_capabilities(self) -> None:
        greeted = self.untagged_responses.pop("CAPABILITY", None)
        if greeted and greeted[-1]:
            self.capabilities = tuple(str(greeted[-1], "ascii", "replace").upper().split())
            return
        super()._get_capabilities()  # type: ignore[misc]


class _Plain(_GreetedCapabilities, imap4.IMAP4WithTimeout):  # type: ignore[misc,unused-ignore]
    pass


class _Tls(_GreetedCapabilities, tls.IMAP4_TLS):  # type: ignore[misc,unused-ignore]
    pass


class Client(IMAPClient):  # type: ignore[misc,unused-ignore]
    """imapclient's client over the connections above."""

    def _create_IMAP4(self) -> imaplib.IMAP4:
        connect_timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _Tls(self.host, self.port, self.ssl_context, connect_timeout)
        return _Plain(self.host, self.port, connect_timeout)

    def known_capabilities(self) -> tuple[bytes, ...]:
        """The capabilities before login, without a round trip: those of the greeting,
        or of the CAPABILITY sent after connecting or after STARTTLS. (imapclient's
        `capabilities()` asks once more after STARTTLS.)"""
        return tuple(str(capability).upper().encode() for capability in self._imap.capabilities)


LOGIN = "LOGIN"
AUTHENTICATE_PLAIN = "AUTHENTICATE PLAIN"


def login_command(user: str, password: str, capabilities: Collection[bytes]) -> str | None:
    """How to log in: LOGIN, which carries ASCII only (RFC 3501 quoted strings), else
    AUTHENTICATE PLAIN, which carries UTF-8 (RFC 4616), when the server offers it;
    None when nothing it offers can carry these."""
    if user.isascii() and password.isascii():
        return LOGIN
    if b"AUTH=PLAIN" in {capability.upper() for capability in capabilities}:
        return AUTHENTICATE_PLAIN
    return None
