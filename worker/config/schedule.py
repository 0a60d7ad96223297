"""The poll schedule: five-field cron with standard meaning, or a fixed interval. Pure.

APScheduler 3 counts day-of-week 0 as Monday and treats day-of-month and day-of-week as
"both must match". Standard cron counts 0 and 7 as Sunday and, when both day fields are
restricted, fires when *either* matches. So the cron text is parsed here into explicit
values, and APScheduler only ever sees numbers and weekday names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import (  # type: ignore[import-untyped,unused-ignore]
    BaseTrigger,
)
from apscheduler.triggers.combining import (  # type: ignore[import-untyped,unused-ignore]
    OrTrigger,
)
from apscheduler.triggers.cron import (  # type: ignore[import-untyped,unused-ignore]
    CronTrigger,
)
from apscheduler.triggers.interval import (  # type: ignore[import-untyped,unused-ignore]
    IntervalTrigger,
)

_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# Standard cron numbering: 0 = Sunday.
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i


_MINUTE = _Field(name="minute", low=0, high=59)
_HOUR = _Field(name="hour", low=0, high=23)
_DAY = _Field(name="day of month", low=1, high=31)
_MONTH = _Field(name="month", low=1, high=12, names=_MONTH_NAMES)
_WEEKDAY = _Field(name="day of week", low=0, high=7, names=_WEEKDAY_NAMES)

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"(?P<number>\d+)\s*(?P<unit>[smhd])", re.IGNORECASE)
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[smhd]?)", re.IGNORECASE)
# A fixed Monday midnight, so interval_hint does not depend on when it is called.
_REFERENCE = datetime(2026, 1, 5)  # the zone is attached per schedule
_HINT_FIRES = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class CronSpec:
    """A cron schedule, its fields already in APScheduler's terms.

    `day_of_week` uses APScheduler's weekday names; `either_day` is True when both day
    fields were restricted, so cron's rule "day of month OR day of week" applies.
    """

    text: str
    timezone: str
    minute: str
    hour: str
    day: str
    month: str
    day_of_week: str
    either_day: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalSpec:
    """Run every `seconds` seconds."""

    text: str
    timezone: str
    seconds: int


ScheduleSpec = CronSpec | IntervalSpec


def parse_schedule(text: str, timezone: str) -> ScheduleSpec:
    """Parse `*/5 * * * *` or `10m`; raise ValueError saying what is wrong."""
    _zone(timezone)
    stripped = text.strip()
    interval = _INTERVAL.fullmatch(stripped)
    if interval:
        seconds = int(interval["number"]) * _UNIT_SECONDS[interval["unit"].lower()]
        if seconds <= 0:
            raise ValueError(f"interval {stripped!r} must be longer than zero")
        return IntervalSpec(text=stripped, timezone=timezone, seconds=seconds)
    fields = stripped.split()
    if len(fields) != 5:
        raise ValueError(
            f"schedule {stripped!r} is neither five cron fields "
            "(minute hour day month weekday) nor an interval such as 30s, 10m, 2h, 1d"
        )
    minute, hour, day, month, weekday = fields
    weekdays = {value % 7 for value in _values(weekday, _WEEKDAY)}
    spec = CronSpec(
        text=stripped,
        timezone=timezone,
        minute=_join(_values(minute, _MINUTE), minute),
        hour=_join(_values(hour, _HOUR), hour),
        day=_join(_values(day, _DAY), day),
        month=_join(_values(month, _MONTH), month),
        day_of_week="*"
        if weekday == "*"
        else ",".join(_WEEKDAY_NAMES[value] for value in sorted(weekdays, key=_monday_first)),
        # Vixie cron: a field that starts with "*" does not restrict.
        either_day=not day.startswith("*") and not weekday.startswith("*"),
    )
    if not _fire_times(build_trigger(spec), _zone(timezone), 1):
        raise ValueError(f"schedule {stripped!r} never fires")
    return spec


def parse_duration(text: str) -> float:
    """Seconds in `900`, `900s`, `15m`, `2h` or `1d`; raise ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 900, 900s, 15m, 2h or 1d")
    seconds = float(match["number"]) * _UNIT_SECONDS[(match["unit"] or "s").lower()]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    return seconds


def build_trigger(spec: ScheduleSpec) -> BaseTrigger:
    """The APScheduler trigger that fires on `spec`."""
    zone = _zone(spec.timezone)
    if isinstance(spec, IntervalSpec):
        return IntervalTrigger(seconds=spec.seconds, timezone=zone)
    if spec.either_day:
        return OrTrigger(
            [
                _cron(spec, zone, day=spec.day, day_of_week="*"),
                _cron(spec, zone, day="*", day_of_week=spec.day_of_week),
            ]
        )
    return _cron(spec, zone, day=spec.day, day_of_week=spec.day_of_week)


def interval_hint(spec: ScheduleSpec) -> float:
    """Seconds between runs, for the health threshold.

    For cron, the longest gap among the first ten fire times after a fixed Monday
    midnight: a weekday schedule's weekend gap counts, so health does not flap on Monday.
    """
    if isinstance(spec, IntervalSpec):
        return float(spec.seconds)
    fires = _fire_times(build_trigger(spec), _zone(spec.timezone), _HINT_FIRES)
    if len(fires) < 2:
        raise ValueError(f"schedule {spec.text!r} fires too rarely to estimate its interval")
    return max((later - earlier).total_seconds() for earlier, later in pairwise(fires))


def _cron(spec: CronSpec, zone: ZoneInfo, *, day: str, day_of_week: str) -> BaseTrigger:
    return CronTrigger(
        second="0",
        minute=spec.minute,
        hour=spec.hour,
        day=day,
        month=spec.month,
        day_of_week=day_of_week,
        timezone=zone,
    )


def _fire_times(trigger: BaseTrigger, zone: ZoneInfo, count: int) -> list[datetime]:
    now = _REFERENCE.replace(tzinfo=zone)
    fires: list[datetime] = []
    previous: datetime | None = None
    for _ in range(count):
        fire: datetime | None = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        fires.append(fire)
        previous = fire
        now = fire + timedelta(microseconds=1)
    return fires


def _monday_first(weekday: int) -> int:
    return (weekday - 1) % 7


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {timezone!r} (use a name such as Europe/Berlin)"
        ) from exc


def _join(values: list[int], raw: str) -> str:
    return "*" if raw == "*" else ",".join(str(value) for value in values)


def _values(text: str, field: _Field) -> list[int]:
    """The sorted values one cron field selects: lists, ranges, steps and names."""
    selected: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{field.name} {text!r} has an empty list item")
        body, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{field.name} {item!r} needs a positive whole step")
            step = int(step_text)
        if body == "*":
            first, last = field.low, field.high
        else:
            start_text, dash, end_text = body.partition("-")
            first = _number(start_text, field, item)
            # "5/15" means "5-max/15", as in cronie.
            last = _number(end_text, field, item) if dash else (field.high if step_text else first)
            if first > last:
                raise ValueError(f"{field.name} range {item!r} runs backwards")
        selected.update(range(first, last + 1, step))
    return sorted(selected)


def _number(text: str, field: _Field, item: str) -> int:
    lowered = text.lower()
    if lowered in field.names:
        value = field.low + field.names.index(lowered)
    elif text.isdigit():
        value = int(text)
    else:
        raise ValueError(f"{field.name} {item!r} is not a number or name")
    if not field.low <= value <= field.high:
        raise ValueError(f"{field.name} {item!r} is outside {field.low}-{field.high}")
    return value
