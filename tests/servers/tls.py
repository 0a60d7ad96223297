"""A throw-away certificate authority for TLS tests on loopback.

Clients trust it through `INVOICE_RELAY_CA_FILE` (or `ca_file=`), never through the
system store, so a test proves the relay adds the file instead of skipping checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TestCA:
    """Paths of a CA certificate and of one server certificate it issued."""

    __test__ = False  # not a pytest test class, despite its name

    ca_file: Path  # PEM of the CA: what clients trust
    cert_file: Path  # PEM of the server certificate (leaf first, then the chain)
    key_file: Path  # PEM of the server's private key


def make_ca(tmp_dir: Path) -> TestCA:
    """Create a CA and a server certificate for `localhost` and `127.0.0.1` in `tmp_dir`."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    server = authority.issue_cert(*SERVER_NAMES)
    ca_file = tmp_dir / "ca.pem"
    cert_file = tmp_dir / "server-cert.pem"
    key_file = tmp_dir / "server-key.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key_file))
    # Servers that drop privileges (Dovecot's login processes) read these after the fork.
    for path in (ca_file, cert_file):
        path.chmod(0o644)
    key_file.chmod(0o600)
    return TestCA(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
