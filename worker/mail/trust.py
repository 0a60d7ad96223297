"""Proof that a mail's From is real: DKIM signatures and trusted Authentication-Results.

The sender allowlist says *who* may send; this module decides whether the From header
can be believed at all. Two kinds of proof, each turned on by its own setting:

* `INVOICE_RELAY_REQUIRE_DKIM`: the relay fetches the whole mail and checks every
  DKIM-Signature with dkimpy (the only module importing it). One signature must verify
  and be *aligned*: its `d=` is the From domain, a parent of it or a subdomain of it
  (the shorter of the two having at least two labels), or is listed in
  `INVOICE_RELAY_DKIM_DOMAINS`. Signatures with `l=` (a body length: anything may be
  appended after the signed part), with `a=rsa-sha1` (RFC 8301) or not covering From
  never count.
* `INVOICE_RELAY_TRUSTED_AUTHSERV_ID`: the topmost Authentication-Results header with
  that authserv-id (the receiving server prepends its own, so a forged one sits below
  it) is parsed with authres; `dkim=pass` with an aligned `header.d` (or `header.i`) or
  `dmarc=pass` for the From domain proves the From. All other such headers are ignored.

With both on, either proof is enough; the intake's step (`worker.mail.proof.SenderProof`)
runs the cheap header check first, and a mail it proves is never fetched whole. A DNS
timeout while no signature passed makes the verdict UNSURE: the mail becomes `error` and
is tried again on a later poll.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import authres  # type: ignore[import-untyped,unused-ignore]
import dkim  # type: ignore[import-untyped,unused-ignore]
import dns.exception  # type: ignore[import-untyped,unused-ignore]
from dkim.dnsplug import get_txt  # type: ignore[import-untyped,unused-ignore]
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped,unused-ignore]

from worker.mail.text import clean_text

MAX_SIGNATURES = 10  # checked per mail; each may cost a DNS lookup
REASON_MAX_CHARS = 400

# dkimpy logs every failed signature at ERROR level; the verdict's reason says it once.
_dkimpy_log = logging.getLogger(__name__ + ".dkimpy")
_dkimpy_log.propagate = False
_dkimpy_log.addHandler(logging.NullHandler())

_AUTHSERV_ID = re.compile(r"\s*(?:\([^()]*\)\s*)*([^\s;()]+)")
# What dkimpy and dnspython raise on hostile signatures, keys or names.
_DKIM_ERRORS = (
    dkim.DKIMException,
    dns.exception.DNSException,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
)


class TxtLookup(Protocol):
    """dkimpy's DNS hook: the TXT record at `name` (b"sel._domainkey.example.com."), or None."""

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None: ...


class Proof(enum.Enum):
    PASSED = "passed"  # the From is proven
    FAILED = "failed"  # no proof: the mail's PDFs are rejected
    UNSURE = "unsure"  # undecided (DNS timed out, the check crashed): an error, retried later


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustPolicy:
    """Which proofs of the From header the relay demands (all off: none)."""

    require_dkim: bool = False
    dkim_domains: tuple[str, ...] = ()  # lower case, signing domains accepted for any From
    trusted_authserv_id: str | None = None  # lower case

    @property
    def active(self) -> bool:
        return self.require_dkim or self.trusted_authserv_id is not None


NO_PROOF = TrustPolicy()  # the default: the From header is taken as it is


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustVerdict:
    proof: Proof
    reason: str  # what proved the From, or why nothing did


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed alignment without a public suffix list: one domain equals the other or is
    its parent, and the shorter has at least two labels. Only whoever runs a domain's
    DNS can publish keys under it, so a parent's signature is its own; siblings
    (`mail.x.example` for `billing.x.example`) do not align: list them instead."""
    signer, sender = signing_domain.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if not signer or not sender:
        return False
    shorter = signer if len(signer) <= len(sender) else sender
    if shorter.count(".") < 1:
        return False
    return signer == sender or sender.endswith("." + signer) or signer.endswith("." + sender)


def _accepted_signer(signing_domain: str, from_domain: str, policy: TrustPolicy) -> bool:
    return signing_domain.rstrip(".").lower() in policy.dkim_domains or aligned(
        signing_domain, from_domain
    )


def short_reason(text: str) -> str:
    """A verdict's reason: cleaned and cut to `REASON_MAX_CHARS`."""
    return clean_text(text, REASON_MAX_CHARS, mark_cut=True)


# --- Authentication-Results ------------------------------------------------------------


def authserv_id_of(value: str) -> str | None:
    """The authserv-id an Authentication-Results value claims (leading comments skipped)."""
    match = _AUTHSERV_ID.match(value)
    return match.group(1).lower() if match else None


def check_authentication_results(
    values: Sequence[str], from_domain: str, policy: TrustPolicy
) -> TrustVerdict:
    """Whether the topmost Authentication-Results from the trusted server proves From."""
    trusted = policy.trusted_authserv_id
    prefix = "Authentication-Results: "
    if trusted is None:
        return TrustVerdict(proof=Proof.FAILED, reason=prefix + "no trusted authserv-id set")
    value = next((item for item in values if authserv_id_of(item) == trusted), None)
    if value is None:
        return TrustVerdict(proof=Proof.FAILED, reason=f"{prefix}none from {trusted}")
    try:
        header = authres.parse_value(value)
    except (authres.AuthResError, ValueError, IndexError, AttributeError) as exc:
        return TrustVerdict(
            proof=Proof.FAILED,
            reason=short_reason(f"{prefix}{trusted}'s header is unreadable: {type(exc).__name__}"),
        )
    if not from_domain:
        return TrustVerdict(proof=Proof.FAILED, reason=f"{prefix}From has no single address")
    seen: list[str] = []
    for result in header.results:
        method = str(getattr(result, "method", "")).lower()
        outcome = str(getattr(result, "result", "")).lower()
        seen.append(f"{method}={outcome}")
        if outcome != "pass":
            continue
        if method == "dkim":
            signer = _property(result, "header", "d") or domain_of(
                _property(result, "header", "i") or ""
            )
            if signer and _accepted_signer(signer, from_domain, policy):
                return TrustVerdict(
                    proof=Proof.PASSED, reason=f"{prefix}{trusted}: dkim=pass d={signer}"
                )
        elif method == "dmarc":
            checked = _property(result, "header", "from")
            if checked is None or checked.rstrip(".").lower() == from_domain:
                return TrustVerdict(
                    proof=Proof.PASSED, reason=f"{prefix}{trusted}: dmarc=pass for {from_domain}"
                )
    found = ", ".join(seen) or "no results"
    return TrustVerdict(
        proof=Proof.FAILED,
        reason=short_reason(f"{prefix}{trusted} shows no aligned pass for {from_domain} ({found})"),
    )


def _property(result: Any, kind: str, name: str) -> str | None:
    for item in getattr(result, "properties", ()):
        if getattr(item, "type", None) == kind and getattr(item, "name", None) == name:
            value = getattr(item, "value", None)
            return str(value) if value else None
    return None


# --- DKIM ------------------------------------------------------------------------------


@dataclass(slots=True)
class _RecordingLookup:
    """Wraps the DNS hook: caches keys for one poll and notes timeouts, which dkimpy
    itself turns into a plain failed signature."""

    lookup: TxtLookup
    cache: dict[bytes, bytes | None] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        if name not in self.cache:
            try:
                self.cache[name] = self.lookup(name, timeout=timeout)
            except dkim.DnsTimeoutError:
                self.timed_out.append(name.decode("ascii", "replace"))
                raise
        return self.cache[name]


class DkimVerifier:
    """Checks the DKIM signatures of whole mails. `lookup` defaults to real DNS."""

    def __init__(self, *, lookup: TxtLookup | None = None, timeout: float = 5.0) -> None:
        self._lookup = _RecordingLookup(lookup or get_txt)
        self._timeout = timeout

    def verify(self, raw: bytes, *, from_domain: str, policy: TrustPolicy) -> TrustVerdict:
        """PASSED when one signature verifies and is aligned with `from_domain` or listed."""
        self._lookup.timed_out.clear()
        if not from_domain:
            return TrustVerdict(proof=Proof.FAILED, reason="DKIM: From has no single address")
        try:
            checker = dkim.DKIM(raw, logger=_dkimpy_log, timeout=self._timeout)
        except _DKIM_ERRORS as exc:
            return TrustVerdict(
                proof=Proof.FAILED, reason=clean_text(f"DKIM: unreadable mail: {exc!r}", 200)
            )
        signatures = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
        if not signatures:
            return TrustVerdict(proof=Proof.FAILED, reason="DKIM: no signature")
        notes: list[str] = []
        for index, value in enumerate(signatures[:MAX_SIGNATURES]):
            proven, note = self._one(checker, index, value, from_domain, policy)
            if proven:
                return TrustVerdict(proof=Proof.PASSED, reason=f"DKIM: {note}")
            notes.append(note)
        if len(signatures) > MAX_SIGNATURES:
            notes.append(f"{len(signatures) - MAX_SIGNATURES} more not checked")
        if self._lookup.timed_out:
            return TrustVerdict(
                proof=Proof.UNSURE,
                reason=short_reason(
                    f"DKIM: DNS lookup timed out: {', '.join(self._lookup.timed_out)}"
                ),
            )
        return TrustVerdict(
            proof=Proof.FAILED,
            reason=short_reason(
                f"DKIM: no valid aligned signature for {from_domain} ({'; '.join(notes)})"
            ),
        )

    def _one(
        self, checker: Any, index: int, value: bytes, from_domain: str, policy: TrustPolicy
    ) -> tuple[bool, str]:
        """Whether signature `index` proves the From, and what was found."""
        try:
            tags = parse_tag_value(value)
            signer = bytes(tags[b"d"]).decode("ascii").strip().lower()
        except (InvalidTagValueList, KeyError, UnicodeDecodeError, TypeError, ValueError):
            return False, "malformed signature"
        label = f"d={signer}"
        if b"l" in tags:
            return False, f"{label}: has l= (body length), not counted"
        if bytes(tags.get(b"a", b"")).lower() == b"rsa-sha1":
            return False, f"{label}: rsa-sha1 is not accepted (RFC 8301)"
        signed = [name.strip().lower() for name in bytes(tags.get(b"h", b"")).split(b":")]
        if b"from" not in signed:
            return False, f"{label}: does not sign From"
        if not _accepted_signer(signer, from_domain, policy):
            return False, f"{label}: not aligned with {from_domain}, not in DKIM_DOMAINS"
        try:
            valid = bool(checker.verify(idx=index, dnsfunc=self._lookup))
        except _DKIM_ERRORS as exc:
            # "body hash mismatch (got ..., expected ...)": the hashes help nobody
            detail = clean_text(str(exc).split(" (", 1)[0], 120)
            return False, f"{label}: {type(exc).__name__}: {detail}"
        return valid, (f"valid signature of {label}" if valid else f"{label}: does not verify")
