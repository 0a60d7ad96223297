"""A real Dovecot IMAP server for integration tests, configured in a temporary directory.

Nothing system-wide is read or written: the configuration, sockets, state, log and mail
all live under `base_dir`. Listeners bind 127.0.0.1 on free ports. Test helpers speak
IMAP with the stdlib `imaplib`, independently of the adapter under test.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.servers.tls import TestCA, make_ca

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm", path="/usr/bin:/usr/sbin") or "/usr/bin/doveadm"
MAIL_USER = "dovecot"  # the unprivileged account the Debian package creates
LOGIN_USER = "dovenull"
START_TIMEOUT = 10.0

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(result: tuple[str, Sequence[object]], what: str) -> Sequence[object]:
    kind, data = result
    if kind != "OK":
        raise RuntimeError(f"Dovecot refused {what}: {data!r}")
    return data


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuth2Passdb:
    """Dovecot's oauth2 passdb instead of any password (tests/servers/token_server.py's
    `dovecot_passdb()` makes one). With `validation_keys` Dovecot validates each access
    token locally, as a JWT (Dovecot 2.3.11 and later, `introspection_mode = local`): the
    signature with the key its header names, `exp`, `nbf` and `iat` against its own clock,
    `iss` among `issuers`, and `audience` among the token's `aud` (Dovecot's `client_id`
    setting: Debian's 2.3.19 carries that check from 2.3.21). With `introspection_url` it
    asks that RFC 7662 endpoint about each token instead."""

    ca_file: Path  # the CA of the token server's certificate
    validation_keys: Mapping[str, str] = field(default_factory=dict)  # "azp/ALG/kid" -> PEM
    issuers: tuple[str, ...] = ()
    audience: str = ""
    introspection_url: str | None = None
    mechanisms: str = "xoauth2 oauthbearer"  # "oauthbearer": a server offering only RFC 7628


def _passdb(password: str, oauth2: OAuth2Passdb | None, root: Path) -> list[str]:
    if oauth2 is None:
        return [
            "passdb {",
            "  driver = static",
            f"  args = password={password}",
            "}",
        ]
    # No password passdb at all: a password login cannot pass by accident. The auth
    # process reads its files after dropping privileges: it gets copies it can reach.
    if oauth2.introspection_url is not None:
        ca_file = root / "oauth2-ca.pem"
        shutil.copyfile(oauth2.ca_file, ca_file)
        ca_file.chmod(0o644)
        settings = [
            "introspection_mode = post",
            f"introspection_url = {oauth2.introspection_url}",
            "force_introspection = yes",
            "username_attribute = username",
            "active_attribute = active",
            "active_value = true",
            f"tls_ca_cert_file = {ca_file}",
        ]
    else:
        if not oauth2.validation_keys:
            raise ValueError("an oauth2 passdb needs validation_keys or an introspection_url")
        keys = root / "oauth2-keys"
        for name, pem in oauth2.validation_keys.items():
            # fs:posix maps the dict key /shared/<azp>/<alg>/<kid> to this file.
            key_file = keys / name
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(pem)
            key_file.chmod(0o644)
        # Every directory from the keys' up to root: the auth process must traverse them.
        for key_file in keys.rglob("*"):
            if key_file.is_dir():
                key_file.chmod(0o755)
        keys.chmod(0o755)
        settings = [
            "introspection_mode = local",
            f"local_validation_key_dict = fs:posix:prefix={keys}/",
            "username_attribute = sub",
            f"issuers = {' '.join(oauth2.issuers)}",
            f"client_id = {oauth2.audience}",
        ]
    args = root / "dovecot-oauth2.conf.ext"
    args.write_text("\n".join(settings) + "\n")
    args.chmod(0o644)
    return [
        "passdb {",
        "  driver = oauth2",
        f"  mechanisms = {oauth2.mechanisms}",
        f"  args = {args}",
        "}",
    ]


def _config(
    *,
    root: Path,
    log_file: Path,
    port: int,
    tls_port: int | None,
    tls: TestCA | None,
    password: str,
    mechanisms: str,
    oauth2: OAuth2Passdb | None = None,
) -> str:
    account = pwd.getpwnam(MAIL_USER)
    lines = [
        f"base_dir = {root / 'run'}",
        f"state_dir = {root / 'state'}",
        f"instance_name = dovecot-test-{port}",
        f"log_path = {log_file}",
        "protocols = imap",
        "listen = 127.0.0.1",
        "shutdown_clients = yes",
        f"default_login_user = {LOGIN_USER}",
        f"default_internal_user = {MAIL_USER}",
        f"first_valid_uid = {account.pw_uid}",
        f"first_valid_gid = {account.pw_gid}",
        f"mail_uid = {MAIL_USER}",
        f"mail_gid = {MAIL_USER}",
        f"mail_location = maildir:{root / 'mail'}/%u",
        # An oauth2 passdb takes only the mechanisms that carry a token.
        f"auth_mechanisms = {oauth2.mechanisms if oauth2 else mechanisms}",
        "disable_plaintext_auth = no",
        # Why a login was refused, in the log (never the password or token itself).
        "auth_verbose = yes",
        # Tests log in wrongly on purpose: no 2 s failure delay, and no anvil penalty
        # that would slow down the next (right) login from the same address.
        "auth_failure_delay = 0",
        "service anvil {",
        "  unix_listener anvil-auth-penalty {",
        "    mode = 0",
        "  }",
        "}",
        *_passdb(password, oauth2, root),
        "userdb {",
        "  driver = static",
        # The oauth2 passdb cannot look a user up: doveadm (`deliver`) may then ask the
        # static userdb alone. Logins still need the passdb.
        f"  args = uid={MAIL_USER} gid={MAIL_USER} home={root / 'home'}/%u"
        + (" allow_all_users=yes" if oauth2 else ""),
        "}",
        "service imap-login {",
        "  inet_listener imap {",
        "    address = 127.0.0.1",
        f"    port = {port}",
        "  }",
        "  inet_listener imaps {",
        "    address = 127.0.0.1",
        f"    port = {tls_port or 0}",
        "    ssl = yes",
        "  }",
        "}",
    ]
    if tls is None:
        lines.append("ssl = no")
    else:
        lines += [
            "ssl = yes",
            f"ssl_cert = <{tls.cert_file}",
            f"ssl_key = <{tls.key_file}",
            "ssl_min_protocol = TLSv1.2",
        ]
        dh_file = Path("/usr/share/dovecot/dh.pem")
        if dh_file.exists():
            lines.append(f"ssl_dh = <{dh_file}")
    return "\n".join(lines) + "\n"


class DovecotServer:
    """One Dovecot instance; `start()`/`stop()` keep its ports, for outage tests."""

    def __init__(
        self,
        base_dir: Path,
        *,
        tls: bool = True,
        password: str | None = None,
        mechanisms: str = "plain login",
        oauth2: OAuth2Passdb | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.user = "invoices@shop.example"
        # A password of the test's own (`pässwörd`) is sent as UTF-8 by AUTHENTICATE PLAIN.
        self.password = password if password is not None else "pw-" + secrets.token_urlsafe(12)
        self.mechanisms = mechanisms  # SASL mechanisms offered as AUTH=...
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls else None
        # Dovecot's unprivileged processes must reach sockets and mail, and a test's
        # tmp_path usually sits below a 0700 directory: they get a root of their own.
        self._root = Path(tempfile.mkdtemp(prefix="invoice-relay-dovecot-"))
        base_dir.mkdir(parents=True, exist_ok=True)  # without TLS, make_ca does not
        self._tls = make_ca(base_dir / "tls") if tls else None
        self.ca_file: Path | None = self._tls.ca_file if self._tls else None
        self.config_file = base_dir / "dovecot.conf"
        self.log_file = base_dir / "dovecot.log"
        self._oauth2 = oauth2
        self._process: subprocess.Popen[bytes] | None = None
        self.announced: frozenset[str] | None = None  # set by drop_capabilities
        self._prepare()

    # --- life cycle --------------------------------------------------------------

    def _prepare(self) -> None:
        account = pwd.getpwnam(MAIL_USER)
        # The mail processes run as `dovecot`: they must reach and own their directories.
        self._root.chmod(0o755)
        for name in ("mail", "home"):
            directory = self._root / name
            directory.mkdir(exist_ok=True)
            os.chown(directory, account.pw_uid, account.pw_gid)
        self.config_file.write_text(
            _config(
                root=self._root,
                log_file=self.log_file,
                port=self.port,
                tls_port=self.tls_port,
                tls=self._tls,
                password=self.password,
                mechanisms=self.mechanisms,
                oauth2=self._oauth2,
            )
        )

    def cleanup(self) -> None:
        """Stop the server and remove its mail and runtime directories."""
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def start(self) -> None:
        if self._process is not None:
            return
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self._process.stdout.read() if self._process.stdout else b""
                self._process = None
                raise RuntimeError(f"dovecot exited: {output.decode(errors='replace')}")
            if self._greets():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"dovecot did not answer on port {self.port}: {self.log()}")

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as conn:
                return conn.recv(64).startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
        # Children of the master (login, imap) share its process group; make sure
        # none of them keeps a port after the master is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def drop_capabilities(self, *names: str) -> frozenset[str]:
        """Restart without announcing `names` after login (MOVE, UIDPLUS), to test a
        client's fallbacks. `imap_capability` (Dovecot 2.3, 20-imap.conf) replaces the
        announced list, so the server's own list minus `names` is written out. Only the
        announcement changes; Dovecot would still run the command if sent. Returns the
        capabilities now announced."""
        with self.session() as client:
            data = _check(client.capability(), "CAPABILITY")
        announced = data[0].decode() if isinstance(data[0], bytes) else str(data[0])
        dropped = {name.upper() for name in names}
        kept = [name for name in announced.split() if name.upper() not in dropped]
        self.stop()
        with self.config_file.open("a") as config:
            config.write(f"protocol imap {{\n  imap_capability = {' '.join(kept)}\n}}\n")
        self.start()
        self.announced = frozenset(name.upper() for name in kept)
        return self.announced

    def folders(self) -> set[str]:
        """The names of every folder (LIST)."""
        with self.session() as client:
            data = _check(client.list(), "LIST")
        names: set[str] = set()
        for line in data:
            if isinstance(line, bytes):
                name = line.rsplit(b" ", 1)[-1].decode()
                names.add(name.strip('"'))
        return names

    def message_ids(self, folder: str = "INBOX") -> dict[int, str]:
        """UID -> Message-ID of every mail in `folder`, read without changing it."""
        with self.session() as client:
            _check(client.select(_quote(folder), readonly=True), "EXAMINE")
            data = _check(
                client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"), "FETCH"
            )
        found: dict[int, str] = {}
        for item in data:
            if isinstance(item, tuple) and (match := re.search(rb"UID (\d+)", item[0])):
                header = item[1].decode(errors="replace").partition(":")[2]
                found[int(match.group(1))] = header.strip()
        return found

    def all_flags(
        self, folder: str = "INBOX", *, keep_recent: bool = False
    ) -> dict[int, frozenset[str]]:
        """UID -> flags of every mail in `folder` (EXAMINE: nothing changes). \\Recent
        belongs to the sessions, not the mail: left out unless `keep_recent`."""
        with self.session() as client:
            _check(client.select(_quote(folder), readonly=True), "EXAMINE")
            data = _check(client.uid("FETCH", "1:*", "(FLAGS)"), "FETCH")
        found: dict[int, frozenset[str]] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if isinstance(line, bytes) and (uid := re.search(rb"UID (\d+)", line)):
                flags = _FLAGS.search(line)
                names = flags.group(1).decode().split() if flags else []
                dropped = set() if keep_recent else {"\\Recent"}
                found[int(uid.group(1))] = frozenset(names) - dropped
        return found

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- helpers that act like a person or a mail server -------------------------

    @contextlib.contextmanager
    def session(self, user: str | None = None) -> Iterator[imaplib.IMAP4]:
        """A logged-in plain IMAP session (the test's own, not the relay's), as `user`
        (another mailbox on this server: any name logs in with the one password)."""
        user = user or self.user
        client = imaplib.IMAP4(self.host, self.port, timeout=30)
        try:
            if self.password.isascii():
                _check(client.login(user, self.password), "LOGIN")
            else:
                plain = f"\0{user}\0{self.password}".encode()
                _check(client.authenticate("PLAIN", lambda _: plain), "AUTHENTICATE")
            yield client
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file is not None:
            context.load_verify_locations(cafile=str(self.ca_file))
        return context

    def append(
        self,
        raw: bytes,
        *,
        folder: str = "INBOX",
        internaldate: datetime | None = None,
        flags: Sequence[str] = (),
    ) -> int:
        """APPEND one mail; returns its UID (from APPENDUID)."""
        with self.session() as client:
            return _append(client, raw, folder=folder, internaldate=internaldate, flags=flags)

    def deliver(self, raw: bytes, *, folder: str = "INBOX") -> None:
        """Put one mail in `folder` as the MTA would (doveadm save): no IMAP login, so it
        works with an oauth2 passdb too, where the test has no token of its own."""
        subprocess.run(
            [DOVEADM, "-c", str(self.config_file), "save", "-u", self.user, "-m", folder],
            input=raw,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def add_folder(self, name: str) -> None:
        """Create a folder as the administrator would (doveadm): no IMAP login needed."""
        subprocess.run(
            [DOVEADM, "-c", str(self.config_file), "mailbox", "create", "-u", self.user, name],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def append_many(
        self,
        raws: Iterable[bytes],
        *,
        folder: str = "INBOX",
        internaldate: datetime | None = None,
        user: str | None = None,
    ) -> list[int]:
        """APPEND many mails over one connection (as `user`); returns their UIDs in order."""
        with self.session(user) as client:
            return [
                _append(client, raw, folder=folder, internaldate=internaldate, flags=())
                for raw in raws
            ]

    def create_folder(self, name: str) -> None:
        with self.session() as client:
            _check(client.create(_quote(name)), "CREATE")

    def delete_uids(self, uids: Iterable[int], folder: str = "INBOX") -> None:
        """Delete mails as a person would: flag \\Deleted, then expunge just those."""
        uid_set = ",".join(str(uid) for uid in uids)
        if not uid_set:
            return
        with self.session() as client:
            _check(client.select(_quote(folder)), "SELECT")
            _check(client.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)"), "STORE")
            _check(client.uid("EXPUNGE", uid_set), "UID EXPUNGE")

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self.session() as client:
            data = _check(client.status(_quote(folder), "(UIDVALIDITY)"), "STATUS")
        match = _UIDVALIDITY.search(data[0] if isinstance(data[0], bytes) else b"")
        if match is None:
            raise RuntimeError(f"no UIDVALIDITY in {data!r}")
        return int(match.group(1))

    def recreate_folder(self, folder: str = "INBOX") -> int:
        """Empty `folder` and give it a new UIDVALIDITY (as a delete and re-create does).

        INBOX cannot be deleted over IMAP, so it is emptied and renumbered with doveadm.
        Returns the new UIDVALIDITY.
        """
        old = self.uidvalidity(folder)
        if folder.upper() == "INBOX":
            with self.session() as client:
                _check(client.select("INBOX"), "SELECT")
                _check(client.store("1:*", "+FLAGS.SILENT", r"(\Deleted)"), "STORE")
                _check(client.expunge(), "EXPUNGE")
            subprocess.run(
                [
                    DOVEADM,
                    "-c",
                    str(self.config_file),
                    "mailbox",
                    "update",
                    "-u",
                    self.user,
                    "--uid-validity",
                    str(old + 1),
                    "INBOX",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        else:
            with self.session() as client:
                _check(client.delete(_quote(folder)), "DELETE")
                _check(client.create(_quote(folder)), "CREATE")
        new = self.uidvalidity(folder)
        if new == old:
            raise RuntimeError(f"UIDVALIDITY of {folder} did not change")
        return new

    def flags(self, uid: int, folder: str = "INBOX") -> frozenset[str]:
        """The flags of one mail, read without changing them (EXAMINE)."""
        with self.session() as client:
            _check(client.select(_quote(folder), readonly=True), "EXAMINE")
            data = _check(client.uid("FETCH", str(uid), "(FLAGS)"), "FETCH")
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if isinstance(line, bytes) and (match := _FLAGS.search(line)):
                # \Recent belongs to the session, not to the mail.
                return frozenset(match.group(1).decode().split()) - {"\\Recent"}
        raise KeyError(uid)


def _append(
    client: imaplib.IMAP4,
    raw: bytes,
    *,
    folder: str,
    internaldate: datetime | None,
    flags: Sequence[str],
) -> int:
    date_time = imaplib.Time2Internaldate(internaldate) if internaldate is not None else None
    flag_list = "(" + " ".join(flags) + ")" if flags else None
    data = _check(client.append(_quote(folder), flag_list, date_time, raw), "APPEND")
    match = _APPENDUID.search(data[0] if isinstance(data[0], bytes) else b"")
    if match is None:
        raise RuntimeError(f"no APPENDUID in {data!r}")
    return int(match.group(2))


@contextlib.contextmanager
def running_dovecot(
    base_dir: Path,
    *,
    tls: bool = True,
    password: str | None = None,
    mechanisms: str = "plain login",
    oauth2: OAuth2Passdb | None = None,
) -> Iterator[DovecotServer]:
    """Start Dovecot with its own configuration under `base_dir`; stop it on exit."""
    server = DovecotServer(
        base_dir, tls=tls, password=password, mechanisms=mechanisms, oauth2=oauth2
    )
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    try:
        yield server
    finally:
        server.cleanup()
