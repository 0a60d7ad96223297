"""The intake's one broad catch: a bug with one mail is that mail's error row."""

from __future__ import annotations

import logging

import pytest

from worker.errors import MailboxError, StoreError
from worker.models import PartRecord, SightingKind
from worker.relay.permail import per_mail


def _explode() -> list[PartRecord]:
    raise KeyError("surprise in a parser")


def test_a_bug_with_one_mail_becomes_its_error_row(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        parts = per_mail(7, _explode, lambda error: [error])
    (error,) = parts
    assert error.kind is SightingKind.ERROR
    assert error.reason is not None
    assert "KeyError" in error.reason
    assert "surprise in a parser" in error.reason
    (record,) = caplog.records
    assert record.exc_info is not None  # logged with its traceback
    assert getattr(record, "action", None) == "mail_error"
    assert getattr(record, "uid", None) == 7


@pytest.mark.parametrize("failure", [MailboxError("gone"), StoreError("locked")])
def test_server_failures_are_not_the_mails_fault(failure: Exception) -> None:
    def step() -> list[PartRecord]:
        raise failure

    with pytest.raises(type(failure)):
        per_mail(7, step, lambda error: [error])
