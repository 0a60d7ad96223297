"""The status page's settings (shared/DESIGN.md, "The status page"): who may sign in,
where it is published, and the secret that signs its sessions. Read by
`worker.config.settings` from the same injected mapping as every other setting."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from worker.config import values
from worker.config.environment import EnvReader
from worker.config.schedule import parse_duration
from worker.models import DEFAULT_WEB_PORT, DEFAULT_WEB_USER, RouteScope

MIN_KEY_BYTES = 32  # of INVOICE_RELAY_SECRET_KEY_FILE, as worker.auth.crypto asks too
DEFAULT_IDLE_SECONDS = 30 * 60.0  # INVOICE_RELAY_WEB_IDLE: a session unused this long ends

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class WebUser:
    """One person who may sign in, and the routes it sees. `password` is the secret as
    configured; `worker.web.auth` keeps only a scrypt hash of it once the page starts."""

    name: str
    password: str = field(compare=False)
    scope: RouteScope = field(default_factory=RouteScope.everything)

    def __repr__(self) -> str:
        return f"WebUser(name={self.name!r}, password=****, scope={self.scope!r})"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class WebSettings:
    port: int = DEFAULT_WEB_PORT
    users: tuple[WebUser, ...] = ()
    secret_key: bytes = field(default=b"", compare=False)  # signs the session cookie
    public_url: str | None = None  # where a reverse proxy publishes the page
    trusted_proxies: tuple[IpNetwork, ...] = ()  # whose X-Forwarded-* headers count
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    keep_pdfs: bool = False  # offers resend and the PDF download
    host: str = "0.0.0.0"  # noqa: S104 - a container's port is published on purpose

    @property
    def https(self) -> bool:
        """Published over https: Secure cookies, HSTS and an Origin check on POSTs."""
        return self.public_url is not None and self.public_url.startswith("https://")

    @property
    def public_origin(self) -> str | None:
        if self.public_url is None:
            return None
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    def __repr__(self) -> str:
        return (
            f"WebSettings(port={self.port}, users={[user.name for user in self.users]}, "
            f"secret_key=****, public_url={self.public_url!r})"
        )


def public_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL such as https://relay.example.com/")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not carry a query or a fragment")
    return text.strip().rstrip("/")


def networks(text: str) -> tuple[IpNetwork, ...]:
    """Comma-separated addresses or networks (`10.0.0.0/8`, `127.0.0.1`, `::1`)."""
    found = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an IP address or network") from None
    return tuple(found)


def user_name(text: str) -> str:
    name = text.strip()
    if not name.isprintable() or not 0 < len(name) <= 64 or " " in name:
        raise ValueError("a user name is 1 to 64 printable characters without spaces")
    return name


def read_web_settings(
    env: EnvReader,
    key_file: Path | None,
    *,
    keep_pdfs: bool,
    extra_users: tuple[WebUser, ...],
) -> WebSettings | None:
    """The status page's settings; None when it is off (no web user, or WEB_PORT 0)."""
    port = env.parse("WEB_PORT", values.port(0), DEFAULT_WEB_PORT)
    name = env.parse("WEB_USER", user_name, DEFAULT_WEB_USER)
    password = env.secret("WEB_PASSWORD", required=False)
    published = env.parse("WEB_PUBLIC_URL", public_url, None)
    no_proxies: tuple[IpNetwork, ...] = ()
    proxies = env.parse("WEB_TRUSTED_PROXIES", networks, no_proxies)
    idle = env.parse("WEB_IDLE", parse_duration, DEFAULT_IDLE_SECONDS)
    # The routes file's `[[web_users]]` join this one (its names are checked there).
    single = () if password is None else (WebUser(name=name, password=password.reveal()),)
    users = single + extra_users
    if port == 0 or not users:
        return None
    # One key file for the process (the stored tokens use it too); worker.web derives
    # its own key from it, so that a session signature never doubles as a token key.
    secret = b""
    if key_file is None:
        if env.raw("SECRET_KEY_FILE") is None:  # else its own problem is listed already
            env.fail("SECRET_KEY_FILE", "required when the status page is on (a web user is set)")
    else:
        try:
            secret = key_file.read_bytes().strip()
        except OSError as exc:
            env.fail("SECRET_KEY_FILE", f"cannot read {key_file}: {exc.strerror}")
        else:
            if len(secret) < MIN_KEY_BYTES:
                env.fail(
                    "SECRET_KEY_FILE",
                    f"{key_file} holds fewer than {MIN_KEY_BYTES} bytes "
                    "(for example the output of `openssl rand -base64 32`)",
                )
    return WebSettings(
        port=port,
        users=users,
        secret_key=secret,
        public_url=published,
        trusted_proxies=proxies,
        idle_seconds=idle,
        keep_pdfs=keep_pdfs,
    )
