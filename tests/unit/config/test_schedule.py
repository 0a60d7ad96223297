"""Cron maths by tables: expected fire times worked out by hand from a calendar.

2026-11-24 is a Tuesday; 2026-03-29 and 2026-10-25 are Europe/Berlin's DST changes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from worker.config.schedule import (
    CronSpec,
    IntervalSpec,
    build_trigger,
    interval_hint,
    parse_duration,
    parse_schedule,
)

TUESDAY = datetime(2026, 11, 24, 10, 7, tzinfo=UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def next_three(text: str, timezone: str, start: datetime) -> list[datetime]:
    trigger = build_trigger(parse_schedule(text, timezone))
    fires: list[datetime] = []
    previous: datetime | None = None
    now = start
    for _ in range(3):
        fire = trigger.get_next_fire_time(previous, now)
        assert isinstance(fire, datetime)
        fires.append(fire)
        previous = fire
        now = fire + timedelta(microseconds=1)
    return fires


@pytest.mark.parametrize(
    ("text", "timezone", "start", "expected"),
    [
        # Monday, numeric and by name
        (
            "0 9 * * 1",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-30 09:00", "2026-12-07 09:00", "2026-12-14 09:00"],
        ),
        (
            "0 9 * * mon",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-30 09:00", "2026-12-07 09:00", "2026-12-14 09:00"],
        ),
        # Sunday is 0 and 7
        (
            "0 9 * * 0",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-29 09:00", "2026-12-06 09:00", "2026-12-13 09:00"],
        ),
        (
            "0 9 * * 7",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-29 09:00", "2026-12-06 09:00", "2026-12-13 09:00"],
        ),
        (
            "0 9 * * SUN",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-29 09:00", "2026-12-06 09:00", "2026-12-13 09:00"],
        ),
        (
            "0 9 * * 6",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-28 09:00", "2026-12-05 09:00", "2026-12-12 09:00"],
        ),
        # weekdays, and a range through Sunday-as-7
        (
            "0 9 * * 1-5",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-25 09:00", "2026-11-26 09:00", "2026-11-27 09:00"],
        ),
        (
            "0 9 * * 5-7",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-27 09:00", "2026-11-28 09:00", "2026-11-29 09:00"],
        ),
        (
            "0 9 * * 0-6",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-25 09:00", "2026-11-26 09:00", "2026-11-27 09:00"],
        ),
        (
            "0 9 * * sat,sun",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-28 09:00", "2026-11-29 09:00", "2026-12-05 09:00"],
        ),
        (
            "0 9 * * mon-wed",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-25 09:00", "2026-11-30 09:00", "2026-12-01 09:00"],
        ),
        (
            "0 9 * * 0,3",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-25 09:00", "2026-11-29 09:00", "2026-12-02 09:00"],
        ),
        (
            "0 9 * * */2",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-26 09:00", "2026-11-28 09:00", "2026-11-29 09:00"],
        ),
        # minutes and hours
        (
            "*/15 * * * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-24 10:15", "2026-11-24 10:30", "2026-11-24 10:45"],
        ),
        (
            "5,35 * * * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-24 10:35", "2026-11-24 11:05", "2026-11-24 11:35"],
        ),
        (
            "30 8-10/2 * * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-24 10:30", "2026-11-25 08:30", "2026-11-25 10:30"],
        ),
        (
            "0 22/1 * * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-24 22:00", "2026-11-24 23:00", "2026-11-25 22:00"],
        ),
        # days of month and months
        (
            "0 0 1 * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-12-01 00:00", "2027-01-01 00:00", "2027-02-01 00:00"],
        ),
        (
            "0 0 31 * *",
            "UTC",
            "2026-11-24 10:07",
            ["2026-12-31 00:00", "2027-01-31 00:00", "2027-03-31 00:00"],
        ),
        (
            "0 0 1 jan-mar *",
            "UTC",
            "2026-11-24 10:07",
            ["2027-01-01 00:00", "2027-02-01 00:00", "2027-03-01 00:00"],
        ),
        (
            "0 0 29 2 *",
            "UTC",
            "2026-11-24 10:07",
            ["2028-02-29 00:00", "2032-02-29 00:00", "2036-02-29 00:00"],
        ),
        # both day fields restricted: day of month OR day of week
        (
            "0 9 1 * 1",
            "UTC",
            "2026-11-24 10:07",
            ["2026-11-30 09:00", "2026-12-01 09:00", "2026-12-07 09:00"],
        ),
        # a day field starting with "*" does not restrict: AND, as in Vixie cron
        (
            "0 9 */10 * 1",
            "UTC",
            "2026-11-24 10:07",
            ["2026-12-21 09:00", "2027-01-11 09:00", "2027-02-01 09:00"],
        ),
        # Europe/Berlin: 09:00 local keeps its wall-clock time across both DST changes
        (
            "0 9 * * *",
            "Europe/Berlin",
            "2026-03-27 12:00",
            ["2026-03-28 08:00", "2026-03-29 07:00", "2026-03-30 07:00"],
        ),
        (
            "0 9 * * *",
            "Europe/Berlin",
            "2026-10-23 12:00",
            ["2026-10-24 07:00", "2026-10-25 08:00", "2026-10-26 08:00"],
        ),
        (
            "0 9 * * 0",
            "Europe/Berlin",
            "2026-10-23 12:00",
            ["2026-10-25 08:00", "2026-11-01 08:00", "2026-11-08 08:00"],
        ),
    ],
)
def test_cron_fires_like_standard_cron(
    text: str, timezone: str, start: str, expected: list[str]
) -> None:
    """Times in the table are UTC."""
    assert next_three(text, timezone, utc(start)) == [utc(when) for when in expected]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), (" 5M ", 300), ("90 s", 90)],
)
def test_interval_schedules(text: str, seconds: int) -> None:
    spec = parse_schedule(text, "UTC")
    assert isinstance(spec, IntervalSpec)
    assert spec.seconds == seconds
    trigger = build_trigger(spec)
    first = trigger.get_next_fire_time(None, TUESDAY)
    second = trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
    assert (second - first).total_seconds() == seconds


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("*/5 * * * *", 300.0),
        ("0 */6 * * *", 6 * 3600.0),
        ("0 9 * * *", 86400.0),
        ("0 9 * * 1-5", 3 * 86400.0),  # the weekend gap counts
        ("0 9 * * 1", 7 * 86400.0),
        ("0 0 1 * *", 31 * 86400.0),
        ("10m", 600.0),
    ],
)
def test_interval_hint(text: str, hint: float) -> None:
    assert interval_hint(parse_schedule(text, "UTC")) == hint


def test_cron_spec_uses_apscheduler_weekday_names() -> None:
    spec = parse_schedule("0 9 * * 5-7", "UTC")
    assert isinstance(spec, CronSpec)
    assert spec.day_of_week == "fri,sat,sun"
    assert not spec.either_day


@pytest.mark.parametrize(
    ("text", "timezone", "message"),
    [
        ("", "UTC", "neither five cron fields"),
        ("* * * *", "UTC", "neither five cron fields"),
        ("* * * * * *", "UTC", "neither five cron fields"),
        ("60 * * * *", "UTC", "minute '60' is outside 0-59"),
        ("* 24 * * *", "UTC", "hour '24' is outside 0-23"),
        ("* * 0 * *", "UTC", "day of month '0' is outside 1-31"),
        ("* * * 13 *", "UTC", "month '13' is outside 1-12"),
        ("* * * * 8", "UTC", "day of week '8' is outside 0-7"),
        ("* * * * fri-mon", "UTC", "runs backwards"),
        ("5-1 * * * *", "UTC", "runs backwards"),
        ("*/0 * * * *", "UTC", "positive whole step"),
        ("*/x * * * *", "UTC", "positive whole step"),
        ("a * * * *", "UTC", "not a number or name"),
        ("1,,2 * * * *", "UTC", "empty list item"),
        ("* * * * funday", "UTC", "not a number or name"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("0s", "UTC", "longer than zero"),
        ("10x", "UTC", "neither five cron fields"),
        ("*/5 * * * *", "Mars/Olympus", "unknown time zone"),
        ("*/5 * * * *", "../etc/passwd", "unknown time zone"),
    ],
)
def test_malformed_schedules_are_refused(text: str, timezone: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(text, timezone)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("900", 900.0),
        ("900s", 900.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5m", 90.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0m", "-5", "15 minutes", "m", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
