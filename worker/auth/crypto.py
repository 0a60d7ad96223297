"""Sealing stored tokens with INVOICE_RELAY_SECRET_KEY_FILE: AES-256-GCM from `cryptography`.

The key file holds at least 32 bytes of secret (random bytes, or text such as the output
of `openssl rand -base64 32`). HKDF-SHA256 derives a separate key per purpose from it, so
the same file can also sign web sessions without the two uses sharing a key. Each sealed
value is bound to its row's identity (the AEAD's associated data): a sealed token copied
onto another identity's row does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker.errors import ConfigError, StoreError

KEY_VARIABLE = "INVOICE_RELAY_SECRET_KEY_FILE"
MIN_KEY_BYTES = 32
_VERSION = b"\x01"  # the first byte of every sealed value: the format, for a later change
_NONCE_BYTES = 12


def read_key_file(path: Path) -> bytes:
    try:
        material = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(KEY_VARIABLE, f"cannot read {path}: {exc.strerror}") from exc
    if len(material) < MIN_KEY_BYTES:
        raise ConfigError(
            KEY_VARIABLE,
            f"{path} holds {len(material)} bytes; it needs at least {MIN_KEY_BYTES} "
            "(for example the output of `openssl rand -base64 32`)",
        )
    return material


class Sealer:
    """Encrypts and decrypts stored tokens; prints nothing of its key."""

    __slots__ = ("_aead", "_digest_key")

    def __init__(self, material: bytes) -> None:
        if len(material) < MIN_KEY_BYTES:
            raise ConfigError(KEY_VARIABLE, f"the key needs at least {MIN_KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(material, b"invoice-relay stored tokens v1"))
        self._digest_key = _derive(material, b"invoice-relay token origin v1")

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        return cls(read_key_file(path))

    def seal(self, plaintext: str, *, bound_to: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), bound_to.encode("utf-8"))
        return _VERSION + nonce + sealed

    def open(self, sealed: bytes, *, bound_to: str) -> str:
        """The plaintext; StoreError when the value was sealed with another key (the key
        file was replaced) or for another row, or was changed."""
        if sealed[:1] != _VERSION or len(sealed) < 1 + _NONCE_BYTES + 16:
            raise StoreError("a stored token has an unknown format")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            plaintext = self._aead.decrypt(nonce, body, bound_to.encode("utf-8"))
        except InvalidTag as exc:
            raise StoreError(
                f"a stored token does not open with {KEY_VARIABLE}: was the key file replaced?"
            ) from exc
        return plaintext.decode("utf-8")

    def digest(self, value: str) -> str:
        """A keyed digest: tells two refresh tokens apart without storing either."""
        return hmac.new(self._digest_key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "Sealer(****)"


def _derive(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(material)
