"""The IMAP connection below `worker.imap.mailbox`: fewer round trips, and logins that
carry UTF-8 (LOGIN or AUTHENTICATE PLAIN) or an OAuth2 token (XOAUTH2, OAUTHBEARER).

imaplib asks for CAPABILITY on every connection, even when the greeting listed them
(`* OK [CAPABILITY IMAP4rev1 ...]`, as Dovecot's and Cyrus's do); here it is asked only
when the greeting did not, and again after STARTTLS, as RFC 3501 requires.
"""

from __future__ import annotations

import imaplib
import logging
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from imapclient import (  # type: ignore[import-untyped,unused-ignore]
    IMAPClient,  # type: ignore[import-untyped,unused-ignore]
    imap4,
    tls,
)
from imapclient.imapclient import (  # type: ignore[import-untyped,unused-ignore]
    IMAPlibLoggerAdapter,
)

from worker.errors import MailboxLoginError, MailboxLoginUnsupported, MailboxTokenRefused
from worker.mail.sasl import Exchange, SaslError, login_with_token, preferred_mechanism
from worker.models import Credentials, PasswordCredentials
from worker.tokens import AccessToken, TokenCredentials

# `ImapConnection._translated`: turns the library's errors during an action into
# `MailboxError`s.
Translated = Callable[[str], AbstractContextManager[None]]


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

    def take_untagged(self, name: str) -> list[Any]:
        """The untagged responses called `name` (`EXISTS`) that came with the answers
        to other commands, removed: imaplib keeps them until a SELECT reads them."""
        taken: list[Any] = self._imap.untagged_responses.pop(name, [])
        return taken


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


def server_text(exc: BaseException) -> str:
    """An imapclient error's text: the server's own words."""
    return str(exc).removeprefix("b'").removesuffix("'")


def log_in(
    client: Any, credentials: Credentials, *, translated: Translated, host: str, port: int
) -> datetime | None:
    """Log in with a password or an OAuth2 token; the token's expiry, None for a
    password. Raises `MailboxError` subclasses (and `TokenEndpointError`)."""
    match credentials:
        case TokenCredentials():
            return _log_in_with_token(
                client, credentials, translated=translated, host=host, port=port
            )
        case PasswordCredentials(user=user, password=secret):
            _log_in_with_password(
                client, user, secret.reveal(), translated=translated, host=host, port=port
            )
            return None


def _log_in_with_token(
    client: Any, credentials: TokenCredentials, *, translated: Translated, host: str, port: int
) -> datetime | None:
    """AUTHENTICATE XOAUTH2 (OAUTHBEARER where that is all the server offers), through
    `sasl_login` with worker.mail.sasl's Exchange: imapclient's `oauth2_login` would
    answer the error challenge with the token again. A refused token gets one retry
    with a fresh one (worker.mail.sasl.login_with_token) on the same connection."""
    offered = frozenset(
        capability.decode("ascii", "replace").removeprefix("AUTH=")
        for capability in client.known_capabilities()
        if capability.startswith(b"AUTH=")
    )
    mechanism = preferred_mechanism(offered)
    if mechanism is None:
        raise MailboxTokenRefused(
            "the server offers neither AUTHENTICATE XOAUTH2 nor OAUTHBEARER "
            "(check INVOICE_RELAY_IMAP_AUTH)",
            host=host,
            port=port,
        )
    refusals: list[str] = []
    expires_at: list[datetime | None] = []  # of the token the server accepted

    def attempt(token: AccessToken) -> SaslError | None:
        exchange = Exchange(mechanism=mechanism, user=credentials.user, token=token.value)
        try:
            with translated(f"AUTHENTICATE {mechanism}"):
                client.sasl_login(mechanism, exchange)
        except MailboxLoginError as exc:
            # The server's own words, without our "IMAP host:port" prefix.
            refusals.append(server_text(exc.__cause__ or exc))
            return exchange.error or SaslError(status="refused")
        expires_at.append(token.expires_at)
        return None

    error = login_with_token(credentials.tokens, attempt)
    if error is not None:
        raise MailboxTokenRefused(
            f"{mechanism} as {credentials.user} ({error.status}"
            f"{', scope ' + error.scope if error.scope else ''}): {refusals[-1]}",
            host=host,
            port=port,
        )
    return expires_at[-1] if expires_at else None


def _log_in_with_password(
    client: Any, user: str, password: str, *, translated: Translated, host: str, port: int
) -> None:
    """LOGIN, or AUTHENTICATE PLAIN in UTF-8 (RFC 4616) for a user or password that
    LOGIN cannot carry (it is ASCII-only)."""
    method = login_command(user, password, client.known_capabilities())
    if method == LOGIN:
        command = client.login
    elif method == AUTHENTICATE_PLAIN:
        command = client.plain_login
    else:
        # Said without the codec's error, which would quote a character of the secret.
        raise MailboxLoginUnsupported(
            "the user or password has non-ASCII characters, which LOGIN cannot carry, "
            "and the server does not offer AUTHENTICATE PLAIN",
            host=host,
            port=port,
        )
    try:
        with translated(method):
            command(user, password)
    except UnicodeError:
        # The codec error would quote a character of the password: do not chain it.
        raise MailboxLoginUnsupported(
            f"the user or password has characters {method} cannot send",
            host=host,
            port=port,
        ) from None
