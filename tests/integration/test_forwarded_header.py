"""The forwarded mail's `X-Invoice-Relay` header as the receiving server got it: one
line, so every reader sees the SHA-256 exactly, without a folded leading space."""

from __future__ import annotations

import hashlib
import re
from email import policy
from email.parser import BytesParser
from pathlib import Path

from tests import samples
from tests.integration.test_relay import relay_env, run_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA


def test_the_relay_header_reaches_the_receiver_unfolded(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, tmp_path: Path
) -> None:
    pdf = samples.invoice_pdf(number="1042")
    imap.append(samples.invoice_mail(pdfs=[("Invoice 1042.pdf", pdf)]))
    env = relay_env(imap, smtp, f"sqlite:///{tmp_path / 'relay.db'}", smtp_ca=smtp_ca)
    assert run_relay(env, "once").returncode == 0

    [received] = smtp.messages
    sha256 = hashlib.sha256(pdf).hexdigest()
    # The bytes the server was sent: the header is one line of 81 characters.
    lines = re.findall(rb"^X-Invoice-Relay:.*\r\n(?:[ \t].*\r\n)*", received.raw, re.MULTILINE)
    assert lines == [f"X-Invoice-Relay: {sha256}\r\n".encode("ascii")]
    # Parsed as a receiver parses them (both of Python's policies), the value is exact.
    for parse_policy in (policy.default, policy.compat32):
        parsed = BytesParser(policy=parse_policy).parsebytes(received.raw)
        assert str(parsed["X-Invoice-Relay"]) == sha256
