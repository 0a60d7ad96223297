"""The whole-poll IMAP deadline as the CLI wires it (worker.cli.wiring.imap_mailbox)."""

from __future__ import annotations

import pytest

from tests.unit.config.test_settings import settings
from worker.cli.wiring import imap_mailbox
from worker.config.environment import Secret
from worker.imap.mailbox import ImapMailbox
from worker.models import PasswordCredentials, Security


@pytest.mark.parametrize(
    ("overrides", "for_idle", "deadline"),
    [
        ({}, False, 1800.0),  # the default: half an hour per poll
        ({"POLL_DEADLINE": "90s"}, False, 90.0),
        # The IDLE watcher's connection stays open for hours by design.
        ({}, True, None),
        ({"POLL_DEADLINE": "90s"}, True, None),
    ],
)
def test_the_polled_mailbox_has_the_deadline_and_the_idle_one_has_none(
    overrides: dict[str, str], for_idle: bool, deadline: float | None
) -> None:
    mailbox = imap_mailbox(settings(**overrides), for_idle=for_idle)
    assert mailbox.deadline_seconds == deadline


def test_a_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="deadline_seconds"):
        ImapMailbox(
            host="imap.test",
            port=143,
            security=Security.NONE,
            credentials=PasswordCredentials(user="u", password=Secret("p")),
            deadline_seconds=0,
        )
