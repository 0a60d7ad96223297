"""Fire times: a pure function of a route's schedule and name, the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.config.schedule import parse_schedule
from worker.service.fires import EPOCH, MAX_OFFSET, latest_fire, next_fire, route_offset

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
NO_OFFSET = timedelta(0)

names = st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)


def fires(text: str, start: datetime, count: int, *, zone: str = "Europe/Berlin") -> list[datetime]:
    spec = parse_schedule(text, zone)
    out: list[datetime] = []
    moment = start
    for _ in range(count):
        moment = next_fire(spec, moment, NO_OFFSET)
        out.append(moment)
    return out


# --- the offset ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "cap"),
    [
        ("5m", MAX_OFFSET),
        ("1d", MAX_OFFSET),
        ("90s", timedelta(seconds=45)),
        ("30s", timedelta(seconds=15)),
        ("1s", timedelta(milliseconds=500)),
        ("*/5 * * * *", MAX_OFFSET),
        ("* * * * *", timedelta(seconds=30)),  # cron's shortest gap counts
        ("0,1 9 * * *", timedelta(seconds=30)),
    ],
)
def test_the_offset_stays_below_half_the_interval_and_a_minute(
    schedule: str, cap: timedelta
) -> None:
    spec = parse_schedule(schedule, "Europe/Berlin")
    offsets = {route_offset(f"route-{index}", spec) for index in range(200)}
    assert all(timedelta(0) <= offset < cap for offset in offsets)
    assert max(offsets) > cap * 0.8  # they spread over the range, not bunched at zero
    assert all(offset % timedelta(milliseconds=1) == timedelta(0) for offset in offsets)


def test_the_offset_is_the_same_in_another_process() -> None:
    """Python salts `hash()` per process; fire times must not depend on it."""
    names = ["shop-a", "shop-b", "client-0042"]
    program = (
        "from datetime import datetime, UTC\n"
        "from worker.config.schedule import parse_schedule\n"
        "from worker.service.fires import route_offset, latest_fire\n"
        "spec = parse_schedule('5m', 'UTC')\n"
        "now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)\n"
        f"for name in {names!r}:\n"
        "    offset = route_offset(name, spec)\n"
        "    print(latest_fire(spec, now, offset).isoformat())\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    spec = parse_schedule("5m", "UTC")
    here = [latest_fire(spec, T0, route_offset(name, spec)) for name in names]
    assert runs[0] == runs[1]
    assert runs[0].split() == [fire.isoformat() for fire in here if fire is not None]
    assert len(set(here)) == 3


def test_a_thousand_routes_spread_their_logins() -> None:
    spec = parse_schedule("5m", "UTC")
    seconds = {
        route_offset(f"client-{index:04}", spec) // timedelta(seconds=1) for index in range(1000)
    }
    assert len(seconds) == 60  # every second of the minute has some routes


# --- intervals, anchored at the epoch --------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        ("10m", T0, T0 + timedelta(minutes=10)),  # strictly after
        ("10m", T0 - timedelta(microseconds=1), T0),
        ("10m", T0 + timedelta(minutes=3), T0 + timedelta(minutes=10)),
        ("7m", EPOCH, EPOCH + timedelta(minutes=7)),
        ("1d", T0, datetime(2026, 6, 2, tzinfo=UTC)),  # midnight UTC, not local
        ("2h", datetime(2026, 6, 1, 14, 30, tzinfo=BERLIN), datetime(2026, 6, 1, 14, tzinfo=UTC)),
    ],
)
def test_interval_next_fire(schedule: str, after: datetime, expected: datetime) -> None:
    assert next_fire(parse_schedule(schedule, "Europe/Berlin"), after, NO_OFFSET) == expected


def test_interval_fire_times_are_the_epoch_plus_whole_intervals_plus_the_offset() -> None:
    spec = parse_schedule("5m", "UTC")
    offset = timedelta(seconds=17, milliseconds=250)
    fire = next_fire(spec, T0, offset)
    assert fire == T0 + offset
    assert latest_fire(spec, T0, offset) == T0 + offset - timedelta(minutes=5)
    assert latest_fire(spec, T0 + offset, offset) == T0 + offset  # at the instant: that one
    assert (fire - offset - EPOCH) % timedelta(minutes=5) == timedelta(0)


@given(moment=moments, name=names, seconds=st.sampled_from([30, 60, 300, 3600, 86400, 7 * 60]))
def test_interval_latest_and_next_bracket_the_moment(
    moment: datetime, name: str, seconds: int
) -> None:
    spec = parse_schedule(f"{seconds}s", "UTC")
    offset = route_offset(name, spec)
    latest = latest_fire(spec, moment, offset)
    following = next_fire(spec, moment, offset)
    assert latest is not None
    assert latest <= moment < following
    assert following - latest == timedelta(seconds=seconds)
    assert next_fire(spec, latest, offset) == following
    # Another process, asked a little later, names the same fire times.
    assert latest_fire(spec, moment + (following - moment) / 2, offset) == latest


@given(moment=moments, name=names)
def test_replicas_asked_at_different_moments_agree(moment: datetime, name: str) -> None:
    spec = parse_schedule("5m", "UTC")
    offset = route_offset(name, spec)
    one = next_fire(spec, moment, offset)
    other = next_fire(spec, moment + timedelta(seconds=1), offset)
    assert other in (one, one + timedelta(minutes=5))


def test_a_naive_moment_is_refused() -> None:
    spec = parse_schedule("5m", "UTC")
    with pytest.raises(ValueError, match="no time zone"):
        next_fire(spec, datetime(2026, 1, 1), NO_OFFSET)
    with pytest.raises(ValueError, match="no time zone"):
        latest_fire(spec, datetime(2026, 1, 1), NO_OFFSET)


# --- cron in the route's time zone -----------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "zone", "now", "latest", "following"),
    [
        (
            "*/5 * * * *",
            "UTC",
            datetime(2026, 6, 1, 12, 7, tzinfo=UTC),
            datetime(2026, 6, 1, 12, 5, tzinfo=UTC),
            datetime(2026, 6, 1, 12, 10, tzinfo=UTC),
        ),
        (  # 09:00 in Berlin is 07:00 UTC in summer
            "0 9 * * *",
            "Europe/Berlin",
            datetime(2026, 6, 1, 12, 0, tzinfo=UTC),
            datetime(2026, 6, 1, 7, 0, tzinfo=UTC),
            datetime(2026, 6, 2, 7, 0, tzinfo=UTC),
        ),
        (  # and 08:00 UTC in winter
            "0 9 * * *",
            "Europe/Berlin",
            datetime(2026, 1, 15, 12, 0, tzinfo=UTC),
            datetime(2026, 1, 15, 8, 0, tzinfo=UTC),
            datetime(2026, 1, 16, 8, 0, tzinfo=UTC),
        ),
        (  # weekdays: on Monday morning the latest was Friday's
            "0 9 * * 1-5",
            "Europe/Berlin",
            datetime(2026, 6, 1, 6, 0, tzinfo=UTC),
            datetime(2026, 5, 29, 7, 0, tzinfo=UTC),
            datetime(2026, 6, 1, 7, 0, tzinfo=UTC),
        ),
        (  # every four years
            "0 0 29 2 *",
            "UTC",
            datetime(2026, 6, 1, tzinfo=UTC),
            datetime(2024, 2, 29, tzinfo=UTC),
            datetime(2028, 2, 29, tzinfo=UTC),
        ),
        (  # every minute of January, asked in December: a dense burst far back
            "* * * 1 *",
            "UTC",
            datetime(2026, 12, 31, 12, 0, tzinfo=UTC),
            datetime(2026, 1, 31, 23, 59, tzinfo=UTC),
            datetime(2027, 1, 1, 0, 0, tzinfo=UTC),
        ),
        (  # at the fire time exactly: that one is the latest
            "30 6 * * *",
            "UTC",
            datetime(2026, 6, 1, 6, 30, tzinfo=UTC),
            datetime(2026, 6, 1, 6, 30, tzinfo=UTC),
            datetime(2026, 6, 2, 6, 30, tzinfo=UTC),
        ),
    ],
)
def test_cron_latest_and_next(
    schedule: str, zone: str, now: datetime, latest: datetime, following: datetime
) -> None:
    spec = parse_schedule(schedule, zone)
    assert latest_fire(spec, now, NO_OFFSET) == latest
    assert next_fire(spec, now, NO_OFFSET) == following


def test_cron_offset_moves_every_fire_time() -> None:
    spec = parse_schedule("*/5 * * * *", "UTC")
    offset = timedelta(seconds=42)
    now = datetime(2026, 6, 1, 12, 5, 30, tzinfo=UTC)  # before 12:05 + 42 s
    assert latest_fire(spec, now, offset) == datetime(2026, 6, 1, 12, 0, 42, tzinfo=UTC)
    assert next_fire(spec, now, offset) == datetime(2026, 6, 1, 12, 5, 42, tzinfo=UTC)


# Europe/Berlin: clocks go forward at 01:00 UTC on 29 March 2026 (02:00 CET -> 03:00 CEST)
# and back at 01:00 UTC on 25 October 2026 (03:00 CEST -> 02:00 CET).
SPRING = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
AUTUMN = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)


def utc(day: int, hour: int, minute: int, *, month: int) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedule", "start", "count", "expected"),
    [
        (  # 02:30 does not exist on 29 March: it fires once, at 02:30 by the old offset
            "30 2 * * *",
            SPRING,
            3,
            [utc(29, 1, 30, month=3), utc(30, 0, 30, month=3), utc(31, 0, 30, month=3)],
        ),
        (  # 02:30 happens twice on 25 October: it fires at both
            "30 2 * * *",
            AUTUMN,
            3,
            [utc(25, 0, 30, month=10), utc(25, 1, 30, month=10), utc(26, 1, 30, month=10)],
        ),
        (  # hourly: the skipped hour is skipped, one hour apart in real time throughout
            "0 * * * *",
            utc(28, 23, 30, month=3),
            4,
            [
                utc(29, 0, 0, month=3),  # 01:00 CET
                utc(29, 1, 0, month=3),  # 03:00 CEST
                utc(29, 2, 0, month=3),
                utc(29, 3, 0, month=3),
            ],
        ),
        (  # hourly across the repeated hour: 02:00 CEST and 02:00 CET both fire
            "0 * * * *",
            utc(24, 23, 30, month=10),
            4,
            [
                utc(25, 0, 0, month=10),  # 02:00 CEST
                utc(25, 1, 0, month=10),  # 02:00 CET
                utc(25, 2, 0, month=10),
                utc(25, 3, 0, month=10),
            ],
        ),
        (  # 09:00 local stays 09:00 local across the change
            "0 9 * * *",
            SPRING,
            2,
            [utc(29, 7, 0, month=3), utc(30, 7, 0, month=3)],
        ),
    ],
)
def test_cron_across_dst_in_berlin(
    schedule: str, start: datetime, count: int, expected: list[datetime]
) -> None:
    got = fires(schedule, start, count)
    assert got == expected
    spec = parse_schedule(schedule, "Europe/Berlin")
    for fire in got:  # latest_fire finds each fire time again
        assert latest_fire(spec, fire, NO_OFFSET) == fire
        assert latest_fire(spec, fire + timedelta(seconds=1), NO_OFFSET) == fire


@given(moment=moments, name=names)
def test_cron_latest_and_next_bracket_the_moment_in_berlin(moment: datetime, name: str) -> None:
    spec = parse_schedule("*/20 1-3 * * *", "Europe/Berlin")
    offset = route_offset(name, spec)
    latest = latest_fire(spec, moment, offset)
    following = next_fire(spec, moment, offset)
    assert latest is not None
    assert latest <= moment < following
    assert next_fire(spec, latest, offset) == following
    local = (following - offset).astimezone(BERLIN)
    assert local.minute in (0, 20, 40)
    # The spring gap moves 02:xx to 03:xx in real time; otherwise the hour is 1-3.
    assert local.hour in (1, 2, 3)


def test_the_latest_cron_fire_is_found_eight_years_back() -> None:
    # 2100 is no leap year: from 29 February 2096 to 29 February 2104 there is none.
    spec = parse_schedule("0 0 29 2 *", "UTC")
    assert latest_fire(spec, datetime(2104, 2, 28, tzinfo=UTC), NO_OFFSET) == datetime(
        2096, 2, 29, tzinfo=UTC
    )
    assert latest_fire(spec, datetime(2104, 3, 1, tzinfo=UTC), NO_OFFSET) == datetime(
        2104, 2, 29, tzinfo=UTC
    )
