"""DKIM for tests: throw-away RSA keys, signed mails, and a DNS stand-in for dkimpy.

dkimpy looks a key up through its `dnsfunc` hook; `KeyServer` answers from a dict, so
no test ever touches the network. Keys are 2048-bit RSA, made once per name and test session.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field

import dkim  # type: ignore[import-untyped,unused-ignore]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id")


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningKey:
    domain: str
    selector: str
    private_pem: bytes  # PKCS#1, as dkimpy reads it
    record: bytes  # the TXT record: v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>

    @property
    def dns_name(self) -> bytes:
        return f"{self.selector}._domainkey.{self.domain}.".encode()


@functools.cache
def _rsa(seed: str) -> rsa.RSAPrivateKey:
    del seed  # one key per distinct name, made once per test session
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signing_key(domain: str, selector: str = "s1") -> SigningKey:
    private = _rsa(f"{selector}.{domain}")
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(
        domain=domain,
        selector=selector,
        private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        record=b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der),
    )


def sign(
    raw: bytes,
    key: SigningKey,
    *,
    length: bool = False,
    headers: tuple[bytes, ...] = SIGNED_HEADERS,
    algorithm: bytes = b"rsa-sha256",
) -> bytes:
    """`raw` with a DKIM-Signature of `key` prepended (relaxed/relaxed canonicalization)."""
    signature: bytes = dkim.sign(
        raw,
        key.selector.encode(),
        key.domain.encode(),
        key.private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=list(headers),
        length=length,
        signature_algorithm=algorithm,
    )
    return signature + raw


@dataclass(slots=True)
class KeyServer:
    """A stand-in for DNS TXT lookups: published records, and names that time out."""

    records: dict[bytes, bytes] = field(default_factory=dict)
    slow: set[bytes] = field(default_factory=set)
    asked: list[bytes] = field(default_factory=list)

    def publish(self, *keys: SigningKey) -> KeyServer:
        for key in keys:
            self.records[key.dns_name] = key.record
        return self

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.asked.append(name)
        if name in self.slow:
            raise dkim.DnsTimeoutError(f"no answer within {timeout}s")
        return self.records.get(name)
