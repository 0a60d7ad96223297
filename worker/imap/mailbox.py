"""The IMAP adapter: one folder, opened read-only. The only module that imports imapclient.

imapclient's untyped results are turned into `worker.models` values at once, and its
errors (and those of `ssl` and `socket` below it) are translated once into
`worker.errors.MailboxError` and its subclasses. Reading never changes the mailbox:
the folder is EXAMINEd (read-only) and bodies are fetched with BODY.PEEK. Only the
after-forward session (`open_for_actions`, INVOICE_RELAY_AFTER_FORWARD other than
`keep`) SELECTs it, to flag or move settled mail.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn

from imapclient import exceptions as imap_errors  # type: ignore[import-untyped,unused-ignore]

from worker.errors import (
    MailboxError,
    MailboxFolderError,
    MailboxLoginError,
    MailboxLoginUnsupported,
    MailboxTokenRefused,
    TokenEndpointError,
)
from worker.imap.results import SUMMARY_ITEMS, section_of, summary_of
from worker.imap.session import AUTHENTICATE_PLAIN, LOGIN, Client, login_command
from worker.mail.sasl import Exchange, SaslError, login_with_token, preferred_mechanism
from worker.models import (
    DEFAULT_TIMEOUT_SECONDS,
    Credentials,
    FolderStatus,
    MailSummary,
    PasswordCredentials,
    Security,
)
from worker.tokens import AccessToken, TokenCredentials

logger = logging.getLogger(__name__)


class ImapMailbox:
    """`worker.relay.ports.Mailbox` and `MailActions` over imapclient. Not thread-safe:
    one session at a time."""

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
        logger.debug(
            "IMAP folder opened",
            extra={"action": "mailbox_opened", "folder": self.folder, "exists": status.exists},
        )
        return status

    def close(self) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                _quietly_logout(client)
        finally:
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.cancel()
            self._deadline = None
            self._token_expires_at = None

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
                _quietly_logout(client)
                raise
        return client

    def _login(self, client: Any) -> None:
        match self.credentials:
            case TokenCredentials() as credentials:
                self._login_with_token(client, credentials)
            case PasswordCredentials(user=user, password=secret):
                self._login_with_password(client, user, secret.reveal())

    def _login_with_token(self, client: Any, credentials: TokenCredentials) -> None:
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
                host=self.host,
                port=self.port,
            )
        refusals: list[str] = []

        def attempt(token: AccessToken) -> SaslError | None:
            exchange = Exchange(mechanism=mechanism, user=credentials.user, token=token.value)
            try:
                with self._translated(f"AUTHENTICATE {mechanism}"):
                    client.sasl_login(mechanism, exchange)
            except MailboxLoginError as exc:
                # The server's own words, without our "IMAP host:port" prefix.
                refusals.append(_server_text(exc.__cause__ or exc))
                return exchange.error or SaslError(status="refused")
            self._token_expires_at = token.expires_at
            return None

        error = login_with_token(credentials.tokens, attempt)
        if error is not None:
            raise MailboxTokenRefused(
                f"{mechanism} as {credentials.user} ({error.status}"
                f"{', scope ' + error.scope if error.scope else ''}): {refusals[-1]}",
                host=self.host,
                port=self.port,
            )

    def _login_with_password(self, client: Any, user: str, password: str) -> None:
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
                host=self.host,
                port=self.port,
            )
        try:
            with self._translated(method):
                command(user, password)
        except UnicodeError:
            # The codec error would quote a character of the password: do not chain it.
            raise MailboxLoginUnsupported(
                f"the user or password has characters {method} cannot send",
                host=self.host,
                port=self.port,
            ) from None

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

    # --- reading ---------------------------------------------------------------------

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        criteria: list[object] = ["UID", f"{after_uid + 1}:*"]
        if since is not None:
            criteria += ["SINCE", since]
        client = self._require_client()
        with self._translated("UID SEARCH"):
            found = client.search(criteria)
        # `n:*` always includes the highest UID, even when it is below n.
        return sorted(uid for uid in (int(value) for value in found) if uid > after_uid)

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        client = self._require_client()
        result: list[MailSummary] = []
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID FETCH"):
                response = client.fetch(batch, SUMMARY_ITEMS)
            for uid in batch:
                data = response.get(uid)
                if data is not None and b"RFC822.SIZE" in data:
                    result.append(summary_of(uid, data))
        # Dovecot answers a FETCH of a mail that another session expunged a moment ago
        # with made-up data (RFC822.SIZE 0, an empty text/plain: RFC 3501 allows it) and
        # `OK [EXPUNGEISSUED]`. No real mail has 0 bytes, so such a UID is looked up
        # (the FETCH delivered the EXPUNGE, so SEARCH knows) and left out when gone,
        # like a UID the server did not describe: recorded as vanished, not `no_pdf`.
        empty = [summary.uid for summary in result if summary.size == 0]
        if empty:
            with self._translated("UID SEARCH"):
                found = {int(value) for value in client.search(["UID", _uid_set(empty)])}
            result = [summary for summary in result if summary.size or summary.uid in found]
        return result

    def fetch_sections(
        self,
        wanted: Mapping[int, Sequence[str]],
        *,
        max_bytes: int | None = None,
        offset: int = 0,
    ) -> dict[tuple[int, str], bytes]:
        client = self._require_client()
        # Mails that want the same sections share one FETCH with a UID set.
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for uid, sections in wanted.items():
            if sections:
                groups[tuple(sorted(set(sections)))].append(uid)
        result: dict[tuple[int, str], bytes] = {}
        for sections, group in groups.items():
            partial = f"<{offset}.{max_bytes}>" if max_bytes is not None else ""
            items = [f"BODY.PEEK[{section}]{partial}" for section in sections]
            for batch in _batches(sorted(group), self.batch_size):
                with self._translated("UID FETCH"):
                    response = client.fetch(batch, items)
                for uid in batch:
                    for key, value in response.get(uid, {}).items():
                        section = section_of(key)
                        if section in sections and isinstance(value, bytes):
                            result[(uid, section)] = value
        return result

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        """`BODY.PEEK[section]<offset.length>`: one range of a large part
        (`worker.mail.ranged.RangedFetch`); empty past the end, None when the mail is gone."""
        return self.fetch_sections({uid: [section]}, max_bytes=length, offset=offset).get(
            (uid, section)
        )

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        client = self._require_client()
        result: dict[int, bytes] = {}
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID FETCH"):
                response = client.fetch(batch, ["BODY.PEEK[]"])
            for uid in batch:
                value = response.get(uid, {}).get(b"BODY[]")
                if isinstance(value, bytes):
                    result[uid] = value
        return result

    # --- IDLE (RFC 2177), on a connection of its own ----------------------------------

    def supports_idle(self) -> bool:
        client = self._require_client()
        with self._translated("CAPABILITY"):
            return bool(client.has_capability("IDLE"))

    def idle_start(self) -> None:
        with self._translated("IDLE"):
            self._require_client().idle()

    def idle_wait(self, timeout: float) -> bool:
        """Wait in IDLE up to `timeout` seconds; True when the server announced mail."""
        client = self._require_client()
        started = time.monotonic()
        with self._translated("IDLE"):
            responses = client.idle_check(timeout=timeout)
        if not responses and time.monotonic() - started < timeout / 2:
            # imapclient returns nothing, at once, when the server has hung up.
            raise MailboxError("connection dropped during IDLE", host=self.host, port=self.port)
        return _announces_mail(responses)

    def idle_done(self) -> bool:
        """Leave IDLE; True when mail was announced since the last `idle_wait`."""
        with self._translated("IDLE DONE"):
            _, responses = self._require_client().idle_done()
        return _announces_mail(responses)

    # --- after forwarding (worker.relay.ports.MailActions), never in `keep` mode ---------

    def open_for_actions(self) -> FolderStatus:
        """Connect, log in and SELECT the folder read-write: only for
        INVOICE_RELAY_AFTER_FORWARD other than `keep`."""
        self.close()
        client = self._connect()
        try:
            self._login(client)
            status = self._select(client, self.folder, readonly=False)
        except (MailboxError, TokenEndpointError):
            _quietly_logout(client)
            raise
        self._client = client
        return status

    def capabilities(self) -> frozenset[str]:
        client = self._require_client()
        with self._translated("CAPABILITY"):
            found = client.capabilities()
        return frozenset(
            (item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)).upper()
            for item in found
        )

    def folder_exists(self, folder: str) -> bool:
        client = self._require_client()
        with self._translated(f"LIST {folder}"):
            return bool(client.folder_exists(folder))

    def present_uids(self, uids: Sequence[int]) -> set[int]:
        client = self._require_client()
        found: set[int] = set()
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID SEARCH"):
                found.update(int(uid) for uid in client.search(["UID", _uid_set(batch)]))
        return found & set(uids)

    def add_flag(self, uids: Sequence[int], flag: str) -> None:
        client = self._require_client()
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID STORE"):
                client.add_flags(batch, [flag], silent=True)

    def move(self, uid: int, folder: str) -> None:
        with self._translated("UID MOVE"):
            self._require_client().move([uid], folder)

    def copy(self, uid: int, folder: str) -> None:
        with self._translated("UID COPY"):
            self._require_client().copy([uid], folder)

    def expunge_uid(self, uid: int) -> None:
        client = self._require_client()
        with self._translated("UID STORE"):
            client.add_flags([uid], [b"\\Deleted"], silent=True)
        with self._translated("UID EXPUNGE"):
            # UID EXPUNGE (RFC 4315) removes this UID only, never other \Deleted mail.
            client.uid_expunge([uid])

    def folder_holds(self, folder: str, message_id: str) -> bool:
        client = self._require_client()
        try:
            self._select(client, folder, readonly=True)
            with self._translated("SEARCH HEADER"):
                found = client.search(["HEADER", "MESSAGE-ID", message_id])
        finally:
            self._select(client, self.folder, readonly=False)
        return bool(found)

    def _select(self, client: Any, folder: str, *, readonly: bool) -> FolderStatus:
        verb = "EXAMINE" if readonly else "SELECT"
        with self._translated(f"{verb} {folder}", folder=folder == self.folder):
            response = client.select_folder(folder, readonly=readonly)
        return FolderStatus(
            uidvalidity=int(response.get(b"UIDVALIDITY", 0)),
            uidnext=int(response.get(b"UIDNEXT", 0)),
            exists=int(response.get(b"EXISTS", 0)),
        )

    # --- helpers ---------------------------------------------------------------------

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
            self._fail(MailboxLoginError, f"login refused: {_server_text(exc)}", exc, action)
        except imap_errors.CapabilityError as exc:
            self._fail(MailboxError, f"{action} not offered by the server", exc, action)
        except imap_errors.IMAPClientAbortError as exc:
            self._fail(MailboxError, f"connection dropped during {action}: {exc}", exc, action)
        except imap_errors.IMAPClientError as exc:
            if folder:
                self._fail(MailboxFolderError, f"{self.folder}: {_server_text(exc)}", exc, action)
            self._fail(MailboxError, f"{action} failed: {_server_text(exc)}", exc, action)
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


def _batches(uids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(uids), size):
        yield list(uids[start : start + size])


def _announces_mail(responses: Sequence[object]) -> bool:
    """Whether IDLE responses such as `(3, b'EXISTS')` tell of mail (EXISTS or RECENT)."""
    return any(
        isinstance(response, tuple) and len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT")
        for response in responses
    )


def _server_text(exc: BaseException) -> str:
    return str(exc).removeprefix("b'").removesuffix("'")


def _quietly_logout(client: Any) -> None:
    try:
        client.logout()
    except (imap_errors.IMAPClientError, OSError):
        with contextlib.suppress(imap_errors.IMAPClientError, OSError):
            client.shutdown()


def _uid_set(uids: Sequence[int]) -> str:
    return ",".join(str(uid) for uid in sorted(uids))
