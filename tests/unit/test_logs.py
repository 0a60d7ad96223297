from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from worker.logs import (
    SECRETS,
    RedactingFilter,
    configure_logging,
    mask_url,
    register_secret,
    register_secrets,
    url_passwords,
)

SECRET = "Zx9-log-secret-41"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    SECRETS.clear()


def capture(fmt: str, level: int = logging.INFO) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt, level, stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def boom(text: str) -> None:
    raise RuntimeError(text)


def test_json_line_has_the_fields() -> None:
    stream = capture("json")
    before = datetime.now(UTC)
    logging.getLogger("worker.relay.pipeline").info(
        "forwarded %s to %s",
        "invoice.pdf",
        "inbox@example.com",
        extra={"action": "pdf_forwarded", "uid": 42, "sha256": "ab" * 32, "mailbox": "INBOX"},
    )
    [entry] = json_lines(stream)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "worker.relay.pipeline"
    assert entry["message"] == "forwarded invoice.pdf to inbox@example.com"
    assert entry["action"] == "pdf_forwarded"
    assert entry["uid"] == 42
    assert entry["sha256"] == "ab" * 32
    assert entry["mailbox"] == "INBOX"
    assert "exc" not in entry
    assert isinstance(entry["ts"], str)
    logged_at = datetime.fromisoformat(entry["ts"])
    assert logged_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= logged_at <= datetime.now(UTC)


def test_json_carries_the_traceback() -> None:
    stream = capture("json")
    try:
        boom("the IMAP server hung up")
    except RuntimeError:
        logging.getLogger("worker.relay.pipeline").exception("mail failed", extra={"uid": 7})
    [entry] = json_lines(stream)
    assert entry["level"] == "ERROR"
    assert isinstance(entry["exc"], str)
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: the IMAP server hung up" in entry["exc"]
    assert entry["uid"] == 7


def test_json_survives_values_json_cannot_hold() -> None:
    stream = capture("json")
    logging.getLogger("worker.test").info("odd", extra={"when": datetime(2026, 11, 24, tzinfo=UTC)})
    [entry] = json_lines(stream)
    assert entry["when"] == "2026-11-24 00:00:00+00:00"


def test_text_line() -> None:
    stream = capture("text")
    logging.getLogger("worker.relay.pipeline").warning(
        "skipped %d mails",
        3,
        extra={"action": "duplicate_skipped", "uid": 12, "subject": "Invoice 1042", "empty": ""},
    )
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(
        r'\d\d:\d\d:\d\d WARNING duplicate_skipped skipped 3 mails uid=12 subject="Invoice 1042" '
        r'empty=""',
        line,
    ), line


def test_text_line_without_action_and_with_traceback() -> None:
    stream = capture("text")
    try:
        boom("disk full")
    except RuntimeError:
        logging.getLogger("worker.store.sqlstore").exception("write failed")
    first, *rest = stream.getvalue().rstrip("\n").split("\n")
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR   write failed", first), first
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: disk full"


def test_text_keeps_a_forged_newline_on_one_line() -> None:
    stream = capture("text")
    logging.getLogger("worker.test").info("subject %s", "Hi\n12:00:00 INFO fake line")
    assert stream.getvalue().count("\n") == 1
    assert "Hi\\n12:00:00 INFO fake line" in stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_redacted_everywhere(fmt: str) -> None:
    stream = capture(fmt)
    register_secret(SECRET)
    logger = logging.getLogger("worker.test")
    logger.info(f"in the message {SECRET}")
    logger.info("in the args %s and %r", SECRET, {"password": SECRET})
    logger.info("in an extra", extra={"action": "login", "url": f"imap://u:{SECRET}@host"})
    logger.info("in a structured extra", extra={"tried": (SECRET, "other")})
    try:
        boom(f"LOGIN failed for password {SECRET}")
    except RuntimeError:
        logger.exception("in a traceback")
    logger.info("in the stack", stack_info=True, extra={"note": SECRET})
    output = stream.getvalue()
    assert SECRET not in output
    assert output.count("****") >= 7
    assert "RuntimeError: LOGIN failed for password ****" in output


def test_longer_secret_is_masked_whole() -> None:
    stream = capture("json")
    register_secrets(["abcd", "abcd-efgh", ""])
    logging.getLogger("worker.test").info("abcd-efgh and abcd and abc")
    [entry] = json_lines(stream)
    assert entry["message"] == "**** and **** and abc"


def test_empty_secret_masks_nothing() -> None:
    stream = capture("json")
    register_secret("")
    logging.getLogger("worker.test").info("plain")
    [entry] = json_lines(stream)
    assert entry["message"] == "plain"


def test_bad_arguments_do_not_crash_the_filter() -> None:
    register_secret(SECRET)
    args = (SECRET,)
    record = logging.LogRecord(
        "worker.test", logging.INFO, __file__, 1, "one %s two %s", args, None
    )
    assert RedactingFilter().filter(record)
    assert record.args is None
    assert "unformattable arguments" in record.getMessage()
    assert SECRET not in record.getMessage()


def test_level_and_quiet_libraries() -> None:
    stream = capture("json", logging.INFO)
    logging.getLogger("worker.test").debug("hidden")
    logging.getLogger("apscheduler.scheduler").info("Added job")
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    logging.getLogger("apscheduler.scheduler").warning("Run time of job was missed")
    logging.getLogger("worker.test").info("shown")
    messages = [entry["message"] for entry in json_lines(stream)]
    assert messages == ["Run time of job was missed", "shown"]


def test_debug_level_shows_our_debug_lines() -> None:
    stream = capture("text", logging.DEBUG)
    logging.getLogger("worker.test").debug("details")
    assert "DEBUG   details" in stream.getvalue()


def test_configuring_twice_replaces_the_handler() -> None:
    first = capture("text")
    second = capture("json")
    logging.getLogger("worker.test").info("once")
    assert first.getvalue() == ""
    assert [entry["message"] for entry in json_lines(second)] == ["once"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        configure_logging("xml")


@pytest.mark.parametrize(
    ("url", "masked", "passwords"),
    [
        ("postgresql://relay:secret@db/relay", "postgresql://relay:****@db/relay", ["secret"]),
        ("postgresql://relay:se@cr/et@db/r", "postgresql://relay:****@db/r", ["se@cr/et"]),
        ("postgresql://relay:@db/relay", "postgresql://relay:****@db/relay", []),
        ("postgresql://relay@db/relay", "postgresql://relay@db/relay", []),
        ("postgresql://db/r?password=x&a=1", "postgresql://db/r?password=****&a=1", ["x"]),
        ("postgresql://u:p@db/r?PASSWORD=q", "postgresql://u:****@db/r?PASSWORD=****", ["p", "q"]),
        ("sqlite:////data/relay.db", "sqlite:////data/relay.db", []),
        ("not a url: user:pw@host", "not a url: user:pw@host", []),
    ],
)
def test_mask_url_masks_every_password_and_only_them(
    url: str, masked: str, passwords: list[str]
) -> None:
    assert mask_url(url) == masked
    assert url_passwords(url) == passwords
