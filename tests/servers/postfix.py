"""Postfix from Debian's `postfix` package, started on a free loopback port with its
own configuration and queue in a temporary directory (nothing system-wide).

It offers PIPELINING and CHUNKING, which aiosmtpd does not. Mail it accepts is relayed
to `relay_port` (the aiosmtpd sink) or, without one, discarded. Its log (`maillog`)
names each session's commands ("mail=3 rcpt=3 bdat=3"). The directory is made with
`mkdtemp` and opened to the `postfix` user, which must traverse it (pytest's
`tmp_path` is private to root).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.servers.smtp_sink import free_port

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin") or "/usr/sbin/postfix"

_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    def __init__(
        self,
        *,
        relay_port: int | None = None,
        max_sessions: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self._settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="invoice-relay-postfix-"))
        self._relay_port = relay_port
        self._max_sessions = max_sessions

    @property
    def _conf(self) -> Path:
        return self.root / "conf"

    def _main_cf(self) -> str:
        root = self.root
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'queue'}",
            f"data_directory = {root / 'data'}",
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = postfix.test",
            "mydestination =",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            # Loopback is in $mynetworks, which the connection limits exempt by default.
            "smtpd_client_event_limit_exceptions =",
        ]
        if self._max_sessions is not None:
            lines.append(f"smtpd_client_connection_count_limit = {self._max_sessions}")
        if self._relay_port is None:
            lines.append("default_transport = discard:")
        else:
            lines += [
                "default_transport = smtp",
                f"relayhost = [127.0.0.1]:{self._relay_port}",
                "smtp_tls_security_level = none",
            ]
        lines += [f"{name} = {value}" for name, value in self._settings.items()]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        os.chmod(self.root, 0o755)  # noqa: S103 - the postfix user must traverse it
        self._conf.mkdir()
        (self.root / "queue").mkdir()
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", "postfix")
        (self._conf / "main.cf").write_text(self._main_cf())
        (self._conf / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n{_SERVICES}"
        )
        subprocess.run([POSTFIX, "-c", str(self._conf), "check"], check=True)
        subprocess.run([POSTFIX, "-c", str(self._conf), "start"], check=True)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.recv(100)  # the greeting: smtpd is up
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling for the port to open; nothing to wait on

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self._conf), "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def session_counts(self) -> list[dict[str, int]]:
        """Per finished session, how many of each command it sent, as smtpd logs them at
        disconnect."""
        counts = []
        for line in self.log().splitlines():
            if " disconnect from " in line:
                # "bdat=1/2": one of two accepted; the total is what was sent.
                found = re.findall(r"(\w+)=(\d+)(?:/(\d+))?", line.split(" disconnect from ", 1)[1])
                counts.append({name: int(total or ok) for name, ok, total in found})
        return counts

    def wait_until_relayed(self, timeout: float = 20.0) -> None:
        """Until every mail the server took in (cleanup logs its Message-ID) has left
        the queue again (relayed or discarded)."""
        taken_in = len(re.findall(r"cleanup\[\d+\]: \w+: message-id=", self.log()))
        self.wait_for_log(r": removed$", taken_in, timeout)

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until `pattern` appears `count` times in the log (a delivery, a disconnect)."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log(), re.M)) < count:
            assert time.monotonic() < deadline, f"{pattern!r} not logged {count} times"
            time.sleep(0.05)  # postfix says so only in its log file; polled


@contextlib.contextmanager
def running_postfix(
    *,
    relay_port: int | None = None,
    max_sessions: int | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Postfix]:
    server = Postfix(relay_port=relay_port, max_sessions=max_sessions, settings=settings)
    try:
        server.start()  # inside: a start that fails leaves no directory or process behind
        yield server
    finally:
        server.stop()
