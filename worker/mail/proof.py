"""The intake's proof step: `SenderProof` applies a `TrustPolicy` to the mails of one
batch, checking trusted Authentication-Results first and fetching whole mails for DKIM
only where that did not prove the From (the checks themselves: `worker.mail.trust`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from worker.mail.batches import size_batches
from worker.mail.trust import (
    DkimVerifier,
    Proof,
    TrustPolicy,
    TrustVerdict,
    check_authentication_results,
    domain_of,
    short_reason,
)
from worker.models import DEFAULT_MAX_MAIL_BYTES, MailSummary

# The records keep the logger name they had before this module was split out of
# worker.mail.trust: log filters and searches match on it.
log = logging.getLogger("worker.mail.trust")


class WholeMails(Protocol):
    """The one thing DKIM asks of a mailbox (`worker.relay.ports.Mailbox` has it): whole
    raw mails, so it is declared here and mail/ depends on no port of the relay."""

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Whole raw mails by UID; mails the server does not return are absent."""


class ProofGuard(Protocol):
    """Runs one mail's proof step; whatever the step raises becomes that mail's verdict
    (the intake's per-mail catch: a hostile key or signature can make dkimpy raise
    anything, and that must not stop the other mails' proofs)."""

    def __call__(self, uid: int, step: Callable[[], TrustVerdict]) -> TrustVerdict: ...


def unguarded(uid: int, step: Callable[[], TrustVerdict]) -> TrustVerdict:
    """No guard: the step's exceptions propagate (for callers that catch themselves)."""
    del uid
    return step()


class SenderProof:
    """Applies a TrustPolicy to the mails of one batch, fetching whole mails for DKIM."""

    def __init__(
        self,
        *,
        policy: TrustPolicy,
        mailbox: WholeMails,
        verifier: DkimVerifier | None = None,
        batch_bytes: int = DEFAULT_MAX_MAIL_BYTES,
    ) -> None:
        self._policy = policy
        self._mailbox = mailbox
        self._verifier = verifier or DkimVerifier()
        self._batch_bytes = batch_bytes

    def check(
        self,
        summaries: Sequence[MailSummary],
        *,
        guard: ProofGuard = unguarded,
        keep: Callable[[int, bytes], None] | None = None,
    ) -> dict[int, TrustVerdict]:
        """A verdict per mail; empty when the policy demands no proof.

        Each mail's header check and DKIM check runs under `guard`; fetching whole mails
        does not (a server failing ends the poll). `keep(uid, raw)` is given each whole
        mail whose DKIM proof passed, while it is in hand, so its parts need not be
        downloaded a second time."""
        policy = self._policy
        if not policy.active:
            return {}
        verdicts: dict[int, TrustVerdict] = {}
        header_reasons: dict[int, str] = {}
        needs_dkim: list[MailSummary] = []
        for summary in summaries:
            from_domain = domain_of(summary.headers.sender_address)
            if policy.trusted_authserv_id is not None:
                verdict = guard(
                    summary.uid,
                    partial(
                        check_authentication_results,
                        summary.headers.authentication_results,
                        from_domain,
                        policy,
                    ),
                )
                if verdict.proof is Proof.PASSED or not policy.require_dkim:
                    verdicts[summary.uid] = verdict
                    continue
                header_reasons[summary.uid] = verdict.reason
            needs_dkim.append(summary)
        for batch in _size_batches(needs_dkim, self._batch_bytes):
            raws = self._mailbox.fetch_messages([summary.uid for summary in batch])
            for summary in batch:
                raw = raws.pop(summary.uid, None)
                if raw is None:
                    verdict = TrustVerdict(
                        proof=Proof.UNSURE, reason="DKIM: the mail vanished from the server"
                    )
                else:
                    verdict = guard(
                        summary.uid,
                        partial(
                            self._verifier.verify,
                            raw,
                            from_domain=domain_of(summary.headers.sender_address),
                            policy=policy,
                        ),
                    )
                if keep is not None and raw is not None and verdict.proof is Proof.PASSED:
                    keep(summary.uid, raw)
                other = header_reasons.get(summary.uid)
                if verdict.proof is not Proof.PASSED and other is not None:
                    verdict = TrustVerdict(
                        proof=verdict.proof, reason=short_reason(f"{verdict.reason}; {other}")
                    )
                verdicts[summary.uid] = verdict
        for uid, verdict in verdicts.items():
            if verdict.proof is not Proof.PASSED:
                log.info(
                    "sender of mail %s not proven: %s",
                    uid,
                    verdict.reason,
                    extra={"action": "sender_unproven", "uid": uid},
                )
        return verdicts


def _size_batches(summaries: Sequence[MailSummary], budget: int) -> list[list[MailSummary]]:
    """Consecutive groups whose mails add up to at most `budget` bytes (at least one each)."""
    groups: list[list[MailSummary]] = []
    start = 0
    for length in size_batches([summary.size for summary in summaries], max_bytes=budget):
        groups.append(list(summaries[start : start + length]))
        start += length
    return groups
