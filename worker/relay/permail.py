"""The relay's one broad catch (STYLE rule 9), and the guards built on it.

Infrastructure errors propagate (the poll ends and nothing of the batch is
recorded); anything else that goes wrong with one mail becomes that mail's
`error` row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from worker.errors import InfrastructureError
from worker.mail.trust import Proof, TrustVerdict
from worker.mail.verdicts import describe
from worker.models import PartRecord, SightingKind
from worker.relay.mailparts import MailPlan

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def per_mail(uid: int, step: Callable[[], _T], on_error: Callable[[PartRecord], _T]) -> _T:
    """The relay's one broad catch: whatever goes wrong with one mail (a bug, a parser
    surprise) becomes that mail's `error` row, logged with its traceback, and the poll
    goes on. A server or the database failing is not the mail's fault: that ends the
    poll, and nothing of the batch is recorded."""
    try:
        return step()
    except InfrastructureError:
        raise
    except Exception as exc:  # recorded as the mail's error, with the traceback logged
        log.exception("could not handle mail %s", uid, extra={"action": "mail_error", "uid": uid})
        return on_error(PartRecord(part="", kind=SightingKind.ERROR, reason=describe(exc)))


def guarded(plan: MailPlan, step: Callable[[], _T], fallback: _T) -> _T:
    """`per_mail` for one step of a planned mail: should the step raise, the mail's
    verdict becomes that error (its later steps then have nothing to do) and the step
    yields `fallback`."""

    def failed(error: PartRecord) -> _T:
        plan.verdict = error
        plan.rejected_parts.clear()
        return fallback

    return per_mail(plan.summary.uid, step, failed)


def proof_guard(uid: int, step: Callable[[], TrustVerdict]) -> TrustVerdict:
    """A proof step that raised leaves the sender unproven for now: the mail is an
    `error`, tried again on a later poll (and `rejected` after a few tries)."""
    return per_mail(uid, step, _unsure)


def _unsure(error: PartRecord) -> TrustVerdict:
    return TrustVerdict(proof=Proof.UNSURE, reason=f"sender proof crashed: {error.reason}")
