"""The IMAP session under `ImapMailbox`: connecting (TLS, STARTTLS), logging in
(`worker.imap.session`), EXAMINE or SELECT, the whole-poll deadline, and the one place
imapclient's errors (and those of `ssl` and `socket` below it) become
`worker.errors.MailboxError` and its subclasses.

Apart from the commands (`worker.imap.mailbox`) so that what can go wrong with a
connection is read, and changed, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from imapclient import exceptions as imap_errors  # type: ignore[import-untyped,unused-ignore]

from worker.errors import (
    MailboxError,
    MailboxFolderError,
    MailboxLoginError,
    TokenEndpointError,
)
from worker.imap.session import Client, log_in, server_text
from worker.models import (
    DEFAULT_TIMEOUT_SECONDS,
    Credentials,
    FolderStatus,
    PasswordCredentials,
    Security,
)
from worker.tokens import TokenCredentials, renew_session_at

__all__ = ["ImapConnection", "quietly_logout"]

logger = logging.getLogger(__name__)


class ImapConnection:
    """One imapclient session, its whole-poll deadline and its errors translated;
    `ImapMailbox` adds the commands. Not thread-safe: one session at a time."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Security,
        credentials: Credentials,
        folder: str = "INBOX",
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        batch_size: int = 200,
        deadline_seconds: float | None = None,
    ) -> None:
        """`timeout` bounds each wait on the server; `deadline_seconds`, when set, the
        whole session from `open()` to `close()` (one poll), however the server paces
        its bytes: at the deadline the connection is cut and the command under way
        fails with a `MailboxError` that says so."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if deadline_seconds is not None and deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")
        self.host = host
        self.port = port
        self.security = security
        self.credentials = credentials
        self.folder = folder
        self.ca_file = ca_file
        self.timeout = timeout
        self.batch_size = batch_size
        self.deadline_seconds = deadline_seconds
        self._client: Any = None
        self._deadline: float | None = None  # time.monotonic() the session must end by
        self._watchdog: threading.Timer | None = None
        self._expired = threading.Event()
        self._token_expires_at: datetime | None = None  # of the token this session used
        self._renew_at: datetime | None = None  # log in again from then on (an OAuth2 login)
        self._opened: FolderStatus | None = None  # the folder as the session first saw it
        self._readonly = True

    def __repr__(self) -> str:
        return (
            f"ImapMailbox(host={self.host!r}, port={self.port}, security={self.security.value}, "
            f"user={self.user!r}, password='****', folder={self.folder!r})"
        )

    @property
    def user(self) -> str:
        return self.credentials.user

    @property
    def _password(self) -> str:
        match self.credentials:
            case PasswordCredentials(password=secret):
                return secret.reveal()
            case TokenCredentials():
                return ""

    # --- the session -----------------------------------------------------------------

    def open(self) -> FolderStatus:
        """Connect, (STARTTLS,) log in and EXAMINE the folder.

        On Dovecot this costs LOGIN and EXAMINE over plain or implicit TLS (its greeting
        lists the capabilities); STARTTLS adds the STARTTLS command and the CAPABILITY
        that must follow it. A server whose greeting lists none costs one CAPABILITY.
        """
        self.close()
        self._start_deadline()
        try:
            client = self._connect()
        except MailboxError:
            self.close()  # stops the watchdog
            raise
        self._client = client  # from here the watchdog can cut it
        try:
            self._login(client)
            status = self._examine(client)
        except (MailboxError, TokenEndpointError):
            self.close()
            raise
        self._opened, self._readonly = status, True
        logger.debug(
            "IMAP folder opened",
            extra={"action": "mailbox_opened", "folder": self.folder, "exists": status.exists},
        )
        return status

    def close(self) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                quietly_logout(client)
        finally:
            self._stop_deadline()
            self._token_expires_at = self._renew_at = self._opened = None

    def token_expires_in(self) -> float | None:
        """Seconds until the OAuth2 token this session logged in with expires (Exchange
        then ends it with `BYE ... AccessTokenExpired`); None for a password login or
        no session."""
        if self._token_expires_at is None:
            return None
        return (self._token_expires_at - datetime.now(UTC)).total_seconds()

    # --- the whole-poll deadline -------------------------------------------------------

    def _start_deadline(self) -> None:
        self._expired.clear()
        if self.deadline_seconds is None:
            return
        self._deadline = time.monotonic() + self.deadline_seconds
        # The socket timeout bounds one wait only: a server sending a byte now and then
        # never trips it. A timer cuts the connection at the deadline instead.
        watchdog = threading.Timer(self.deadline_seconds, self._expire)
        watchdog.daemon = True
        watchdog.name = "invoice-relay-imap-deadline"
        self._watchdog = watchdog
        watchdog.start()

    def _stop_deadline(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        self._deadline = None

    def _expire(self) -> None:
        self._expired.set()
        client = self._client
        if client is not None:
            logger.warning(
                "the poll's IMAP deadline of %gs passed: cutting the connection",
                self.deadline_seconds,
                extra={"action": "poll_deadline_passed"},
            )
            # Shutting the socket down (not reading or writing it) makes the waiting
            # command fail at once in the thread that runs it.
            with contextlib.suppress(OSError):
                client.socket().shutdown(socket.SHUT_RDWR)

    def _wait_bound(self) -> float:
        """The socket timeout for connecting: the timeout, or the time left if less."""
        if self._deadline is None:
            return self.timeout
        return max(min(self.timeout, self._deadline - time.monotonic()), 0.001)

    def _deadline_detail(self, action: str) -> str:
        return (
            f"the poll took longer than its deadline of {self.deadline_seconds:g}s "
            f"(INVOICE_RELAY_POLL_DEADLINE) and was cut during {action}"
        )

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                # Added to the system store, not replacing it.
                context.load_verify_locations(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise MailboxError(
                    f"cannot read CA file {self.ca_file} (INVOICE_RELAY_CA_FILE): {exc}",
                    host=self.host,
                    port=self.port,
                ) from exc
        return context

    def _connect(self) -> Any:
        context = self._tls_context() if self.security is not Security.NONE else None
        with self._translated("connect"):
            client = Client(
                self.host,
                port=self.port,
                ssl=self.security is Security.SSL,
                ssl_context=context,
                timeout=self._wait_bound(),
            )
        client.normalise_times = False  # aware datetimes, in the server's offset
        if self.security is Security.STARTTLS:
            try:
                with self._translated("STARTTLS"):
                    client.starttls(context)
                    # The wrapped socket must keep the timeout of the plain one.
                    client.socket().settimeout(self.timeout)
            except MailboxError:
                quietly_logout(client)
                raise
        return client

    def _login(self, client: Any) -> None:
        now = datetime.now(UTC)
        expires_at = log_in(
            client, self.credentials, translated=self._translated, host=self.host, port=self.port
        )
        self._token_expires_at = expires_at
        self._renew_at = (
            None if expires_at is None else renew_session_at(expires_at, logged_in_at=now)
        )

    def _renewed(self) -> Any:
        """The session for the next command; logged in again first, with a fresh token,
        when the one it used is about to expire (`worker.tokens.renew_session_at`). The
        folder is opened as before, and must still have its UIDVALIDITY. Never inside
        IDLE: the IDLE watcher renews its own session."""
        client = self._require_client()
        opened = self._opened
        if self._renew_at is None or opened is None or datetime.now(UTC) < self._renew_at:
            return client
        logger.info(
            "IMAP session renewed before its OAuth2 token expires",
            extra={"action": "imap_session_renewed", "folder": self.folder},
        )
        self._client = None
        quietly_logout(client)
        client = self._connect()
        self._client = client
        try:
            self._login(client)
            status = (
                self._examine(client)
                if self._readonly
                else self._select(client, self.folder, readonly=False)
            )
            if status.uidvalidity != opened.uidvalidity:
                raise MailboxFolderError(
                    f"{self.folder}: UIDVALIDITY changed while the session was renewed",
                    host=self.host,
                    port=self.port,
                )
        except (MailboxError, TokenEndpointError):
            self.close()
            raise
        self._opened = opened  # close() would have dropped it; the session goes on
        return client

    def _examine(self, client: Any) -> FolderStatus:
        with self._translated(f"EXAMINE {self.folder}", folder=True):
            response = client.select_folder(self.folder, readonly=True)
            uidvalidity = response.get(b"UIDVALIDITY")
            uidnext = response.get(b"UIDNEXT")
            if uidvalidity is None or uidnext is None:
                # Older servers leave them out of SELECT; STATUS always has them.
                status = client.folder_status(self.folder, ("UIDVALIDITY", "UIDNEXT"))
                uidvalidity = status[b"UIDVALIDITY"]
                uidnext = status[b"UIDNEXT"]
        return FolderStatus(
            uidvalidity=int(uidvalidity),
            uidnext=int(uidnext),
            exists=int(response.get(b"EXISTS", 0)),
        )

    def _select(self, client: Any, folder: str, *, readonly: bool) -> FolderStatus:
        verb = "EXAMINE" if readonly else "SELECT"
        with self._translated(f"{verb} {folder}", folder=folder == self.folder):
            response = client.select_folder(folder, readonly=readonly)
        return FolderStatus(
            uidvalidity=int(response.get(b"UIDVALIDITY", 0)),
            uidnext=int(response.get(b"UIDNEXT", 0)),
            exists=int(response.get(b"EXISTS", 0)),
        )

    # --- errors ---------------------------------------------------------------------

    def _require_client(self) -> Any:
        if self._client is None:
            raise MailboxError("not connected (open() first)", host=self.host, port=self.port)
        return self._client

    @contextlib.contextmanager
    def _translated(self, action: str, *, folder: bool = False) -> Iterator[None]:
        """Turn imapclient, ssl and socket errors during `action` into MailboxError."""
        if self._expired.is_set():
            raise MailboxError(self._deadline_detail(action), host=self.host, port=self.port)
        try:
            yield
        except MailboxError:
            raise
        except imap_errors.LoginError as exc:
            self._fail(MailboxLoginError, f"login refused: {server_text(exc)}", exc, action)
        except imap_errors.CapabilityError as exc:
            self._fail(MailboxError, f"{action} not offered by the server", exc, action)
        except imap_errors.IMAPClientAbortError as exc:
            self._fail(MailboxError, f"connection dropped during {action}: {exc}", exc, action)
        except imap_errors.IMAPClientError as exc:
            if folder:
                self._fail(MailboxFolderError, f"{self.folder}: {server_text(exc)}", exc, action)
            self._fail(MailboxError, f"{action} failed: {server_text(exc)}", exc, action)
        except ssl.SSLCertVerificationError as exc:
            self._fail(
                MailboxError,
                f"TLS certificate not trusted (set INVOICE_RELAY_CA_FILE): {exc.verify_message}",
                exc,
                action,
            )
        except ssl.SSLError as exc:
            self._fail(
                MailboxError, f"TLS failed during {action}: {exc.reason or exc}", exc, action
            )
        except TimeoutError as exc:
            self._fail(
                MailboxError, f"timed out after {self.timeout:g}s during {action}", exc, action
            )
        except ConnectionRefusedError as exc:
            self._fail(MailboxError, "connection refused", exc, action)
        except OSError as exc:
            self._fail(MailboxError, f"network error during {action}: {exc}", exc, action)

    def _fail(
        self, kind: type[MailboxError], detail: str, exc: BaseException, action: str
    ) -> NoReturn:
        if self._expired.is_set():  # the watchdog cut the connection: say so
            kind, detail = MailboxError, self._deadline_detail(action)
        # Servers do not echo the password; this is a guard, not a expected path.
        if len(self._password) >= 4:
            detail = detail.replace(self._password, "****")
        raise kind(detail, host=self.host, port=self.port) from exc


def quietly_logout(client: Any) -> None:
    """LOGOUT, or just close the socket when the server cannot answer; never raises."""
    try:
        client.logout()
    except (imap_errors.IMAPClientError, OSError):
        with contextlib.suppress(imap_errors.IMAPClientError, OSError):
            client.shutdown()
