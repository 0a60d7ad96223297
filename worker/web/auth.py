"""Who is signed in: password hashes, the slowing of failed logins, the client's address.

Pure apart from hashing: the clock is handed in, so the throttle is tested by tables.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from worker.config.web import IpNetwork, WebUser
from worker.models import RouteScope

# scrypt's cost (RFC 7914): 16 MiB and some 50 ms a check; enough that a leaked process
# memory image gives no passwords cheaply, little enough for one login.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, **_SCRYPT)


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """A web user as the running page keeps it: a salted scrypt hash, never the password."""

    name: str
    scope: RouteScope
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    @classmethod
    def from_user(cls, user: WebUser) -> Account:
        salt = secrets.token_bytes(16)
        return cls(name=user.name, scope=user.scope, salt=salt, digest=_hash(user.password, salt))


class PasswordBook:
    """Checks a name and password in constant time: an unknown name costs one scrypt
    too, so the time of a refusal does not tell which names exist."""

    def __init__(self, users: Iterable[WebUser]) -> None:
        self._accounts = {user.name: Account.from_user(user) for user in users}
        self._decoy = Account.from_user(WebUser(name="", password=secrets.token_hex(16)))

    def account(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def check(self, name: str, password: str) -> Account | None:
        account = self._accounts.get(name)
        target = account if account is not None else self._decoy
        matches = hmac.compare_digest(_hash(password, target.salt), target.digest)
        return account if matches and account is not None else None


@dataclass(slots=True)
class _Failures:
    count: int
    blocked_until: float


class LoginThrottle:
    """Failed logins slow the next ones from the same client address: after `free`
    failures each one blocks that address for `base` seconds, doubled per failure up
    to `cap`. A success forgets the address. At most `max_addresses` are remembered
    (the oldest go first), so a flood of addresses cannot grow memory without bound."""

    def __init__(
        self, *, free: int = 3, base: float = 1.0, cap: float = 60.0, max_addresses: int = 10_000
    ) -> None:
        self._free = free
        self._base = base
        self._cap = cap
        self._max = max_addresses
        self._failures: dict[str, _Failures] = {}

    def wait_seconds(self, address: str, now: float) -> float:
        """0 when `address` may try now, else how long it must wait."""
        failures = self._failures.get(address)
        return 0.0 if failures is None else max(failures.blocked_until - now, 0.0)

    def failed(self, address: str, now: float) -> None:
        previous = self._failures.pop(address, None)
        count = 1 if previous is None else previous.count + 1
        delay = 0.0
        if count > self._free:
            delay = min(self._base * 2 ** (count - self._free - 1), self._cap)
        self._failures[address] = _Failures(count=count, blocked_until=now + delay)
        while len(self._failures) > self._max:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def client_address(
    peer: str | None, headers: Mapping[str, str], trusted: Iterable[IpNetwork]
) -> str:
    """The browser's address: the peer's, unless the peer is a trusted proxy, then the
    right-most address of X-Forwarded-For that is not one of the trusted proxies (the
    left part of the header is whatever the client sent and proves nothing)."""
    networks = tuple(trusted)
    if peer is None:
        return "unknown"
    if not _inside(peer, networks):
        return peer
    forwarded = [item.strip() for item in headers.get("x-forwarded-for", "").split(",")]
    for candidate in reversed([item for item in forwarded if item]):
        if not _valid(candidate):
            return peer  # a header we cannot read: count the proxy, not a guess
        if not _inside(candidate, networks):
            return candidate
    return peer


def _valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _inside(text: str, networks: tuple[IpNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()
