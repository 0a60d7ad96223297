"""A real SMTP server on loopback that stores what it accepts and answers errors on cue.

Built on aiosmtpd's threaded `Controller`. Plain, STARTTLS (`tls_cert`) or implicit
TLS (`implicit_tls=True`); AUTH PLAIN/LOGIN with one fixed account when `auth` is set,
or only AUTH XOAUTH2 with the tokens a validator accepts when `oauth2` is set.
Scripted answers: `fail_next`, `fail_matching`, `fail_rate`, `stall_next`, `drop_next`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Stage = Literal["mail", "rcpt", "data"]
SERVER_NAME = "sink.invoice-relay.test"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedMail:
    """One mail the sink accepted: its envelope, raw bytes and parsed form."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage


@dataclass(slots=True, kw_only=True)
class _Rule:
    """One scripted answer; `remaining` None means it never runs out."""

    stage: Stage
    code: int = 0
    text: str = ""
    remaining: int | None = 1
    matches: Callable[[EmailMessage], bool] | None = None
    chance: Callable[[], bool] | None = None
    stall_seconds: float = 0.0
    drop: bool = False

    def applies(self, stage: Stage, message: EmailMessage | None) -> bool:
        if stage != self.stage or self.remaining == 0:
            return False
        if self.matches is not None and (message is None or not self.matches(message)):
            return False
        return self.chance is None or self.chance()


@dataclass(slots=True)
class _Script:
    rules: list[_Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, stage: Stage, message: EmailMessage | None) -> _Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.applies(stage, message):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
            return None


def parse_mail(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)


class _Handler:
    """aiosmtpd hooks; runs on the controller's thread."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def _scripted(
        self, server: SMTP, stage: Stage, message: EmailMessage | None
    ) -> str | None:
        rule = self._sink._script.take(stage, message)
        if rule is None:
            return None
        if rule.drop:
            # Hang up without an answer, as a crashing server or a cut line would.
            if isinstance(server.transport, asyncio.Transport):
                server.transport.abort()
            return "421 4.4.2 connection dropped"
        if rule.stall_seconds:
            await asyncio.sleep(rule.stall_seconds)
            return None
        self._sink._record_refusal(stage, rule.code)
        return f"{rule.code} {rule.text}"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = await self._scripted(server, "mail", None)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = await self._scripted(server, "rcpt", None)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message = parse_mail(raw)
        refusal = await self._scripted(server, "data", message)
        if refusal is not None:
            return refusal
        number = self._sink._store(
            ReceivedMail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw,
                message=message,
            )
        )
        return f"250 2.0.0 OK queued as sink-{number}"


# XOAUTH2's initial response carries a whole token on the AUTH line (Microsoft's access
# tokens are JWTs of 1.5 to 3 KB); aiosmtpd allows 512 bytes per command by default.
OAUTH_AUTH_LINE_LIMIT = 16 * 1024


class _OAuthSMTP(SMTP):
    # The reader's limit is one for all lines (RFC 5321's 1,000 bytes also bounds DATA
    # lines): this sink accepts longer mail lines too, which no test here relies on.
    line_length_limit = OAUTH_AUTH_LINE_LIMIT + 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The class keeps one shared dict of limits: this server gets its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.command_size_limits["AUTH"] = OAUTH_AUTH_LINE_LIMIT


class _OAuthController(Controller):
    def factory(self) -> SMTP:
        return _OAuthSMTP(self.handler, **self.SMTP_kwargs)


class _OAuthHandler(_Handler):
    """Adds AUTH XOAUTH2: the token must be one the validator accepts for the user, and
    stay so: each MAIL FROM asks again, and a session whose token has expired since
    its AUTH is refused (`expired_refusals`), as a server enforcing token lifetimes would."""

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        user, token = getattr(session, "oauth_login", ("", ""))
        if token and not self._sink.accepts_token(user, token):
            self._sink.record_expired()
            return "421 4.7.0 The access token of this session has expired"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) > 1:
            blob = args[1].encode()
            try:
                initial = base64.b64decode(blob, validate=True)
            except binascii.Error:
                return AuthResult(
                    success=False, handled=False, message="501 5.5.2 Cannot decode base64"
                )
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
            initial = answer
        fields = dict(
            part.split("=", 1)
            for part in initial.decode("utf-8", "replace").split("\x01")
            if "=" in part
        )
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        if self._sink.accepts_token(user, token):
            self._sink.record_login(user)
            if server.session is not None:  # what the next MAIL FROM checks again
                setattr(server.session, "oauth_login", (user, token))  # noqa: B010
            return AuthResult(success=True)
        # As Google and Microsoft do: a JSON error as a 334 challenge, then 535 once the
        # client has answered it (with an empty line).
        await server.challenge_auth(
            json.dumps({"status": "401", "schemes": "bearer", "scope": "SMTP.Send"})
        )
        return AuthResult(
            success=False, handled=False, message="535 5.7.3 Authentication unsuccessful"
        )


class SmtpSink:
    """The server's state; survives `stop()`/`start()` (an outage) on the same port."""

    def __init__(
        self,
        *,
        port: int,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        auth_excluded: tuple[str, ...] = (),
        oauth2: Callable[[str, str], bool] | None = None,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a TLS certificate")
        self.host = "127.0.0.1"
        self.port = port
        self._tls_context = tls_context
        self._implicit_tls = implicit_tls
        self._auth = auth
        self._auth_excluded = auth_excluded  # mechanisms not offered, e.g. ("PLAIN",)
        self._oauth2 = oauth2  # (user, token) -> valid: then AUTH XOAUTH2 is all it offers
        self._script = _Script()
        self._lock = threading.Lock()
        self._received: list[ReceivedMail] = []
        self._refusals: list[tuple[Stage, int]] = []
        self._logins: list[str] = []
        self.expired_refusals = 0  # MAIL FROM refused: the session's token had expired
        self._controller: Controller | None = None

    # --- what happened ---------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._received)

    def received_count(self) -> int:
        """How many mails were accepted so far, without copying them."""
        with self._lock:
            return len(self._received)

    @property
    def refusals(self) -> list[tuple[Stage, int]]:
        """Scripted refusals answered so far, as (stage, code)."""
        with self._lock:
            return list(self._refusals)

    @property
    def logins(self) -> list[str]:
        """User names that logged in successfully."""
        with self._lock:
            return list(self._logins)

    def _store(self, mail: ReceivedMail) -> int:
        with self._lock:
            self._received.append(mail)
            return len(self._received)

    def _record_refusal(self, stage: Stage, code: int) -> None:
        with self._lock:
            self._refusals.append((stage, code))

    # --- scripted answers ----------------------------------------------------------------

    def fail_next(self, code: int, text: str, n: int = 1, stage: Stage = "data") -> None:
        """Answer the next `n` commands of `stage` with `code text`."""
        with self._script.lock:
            self._script.rules.append(_Rule(stage=stage, code=code, text=text, remaining=n))

    def fail_matching(
        self, predicate: Callable[[EmailMessage], bool], code: int, text: str
    ) -> None:
        """Answer `code text` at end of data to every mail for which `predicate` holds."""
        with self._script.lock:
            self._script.rules.append(
                _Rule(stage="data", code=code, text=text, remaining=None, matches=predicate)
            )

    def fail_rate(self, ratio: float, code: int, seed: int, text: str = "try again") -> None:
        """Answer `code` at end of data to a seeded-random `ratio` of the mails."""
        draw = random.Random(seed)
        with self._script.lock:
            self._script.rules.append(
                _Rule(
                    stage="data",
                    code=code,
                    text=text,
                    remaining=None,
                    chance=lambda: draw.random() < ratio,
                )
            )

    def stall_next(self, seconds: float, n: int = 1) -> None:
        """Wait `seconds` before accepting the next `n` mails (to outlast a client timeout)."""
        with self._script.lock:
            self._script.rules.append(_Rule(stage="data", remaining=n, stall_seconds=seconds))

    def drop_next(self, n: int = 1, stage: Stage = "data") -> None:
        """Hang up, without an answer, on the next `n` commands of `stage`."""
        with self._script.lock:
            self._script.rules.append(_Rule(stage=stage, remaining=n, drop=True))

    def clear_failures(self) -> None:
        with self._script.lock:
            self._script.rules.clear()

    # --- lifecycle ----------------------------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if self._auth is not None and isinstance(data, LoginPassword):
            user, password = self._auth
            if data.login == user.encode() and data.password == password.encode():
                with self._lock:
                    self._logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def accepts_token(self, user: str, token: str) -> bool:
        return self._oauth2 is not None and bool(user) and self._oauth2(user, token)

    def record_login(self, user: str) -> None:
        with self._lock:
            self._logins.append(user)

    def record_expired(self) -> None:
        with self._lock:
            self.expired_refusals += 1

    def start(self) -> None:
        if self._controller is not None:
            return
        options: dict[str, Any] = {}
        if self._tls_context is not None:
            options["ssl_context" if self._implicit_tls else "tls_context"] = self._tls_context
        if self._auth is not None or self._oauth2 is not None:
            options["authenticator"] = self._authenticate
            options["auth_require_tls"] = False  # loopback only
            options["auth_exclude_mechanism"] = self._auth_excluded
        if self._oauth2 is not None:
            options["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        controller_class = Controller if self._oauth2 is None else _OAuthController
        handler = _Handler(self) if self._oauth2 is None else _OAuthHandler(self)
        controller = controller_class(
            handler,
            hostname=self.host,
            port=self.port,
            server_hostname=SERVER_NAME,
            ready_timeout=10.0,
            **options,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context


@contextmanager
def running_sink(
    *,
    tls_cert: tuple[Path, Path] | None = None,
    auth: tuple[str, str] | None = None,
    auth_excluded: tuple[str, ...] = (),
    implicit_tls: bool = False,
    oauth2: Callable[[str, str], bool] | None = None,
) -> Iterator[SmtpSink]:
    """A started sink on a free loopback port; `tls_cert` is (cert chain PEM, key PEM).
    `oauth2` (user, token) -> valid makes AUTH XOAUTH2 its only login."""
    context = server_tls_context(*tls_cert) if tls_cert is not None else None
    sink = SmtpSink(
        port=free_port(),
        tls_context=context,
        implicit_tls=implicit_tls,
        auth=auth,
        auth_excluded=auth_excluded,
        oauth2=oauth2,
    )
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
