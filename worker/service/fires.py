"""When a route polls: its fire times, as a pure function of its schedule and its name.

Every replica computes the same fire times for a route, so that a fire time can be
claimed in the database by exactly one of them. Intervals are anchored at the Unix epoch
(`10m` fires at :00, :10, ... UTC, whenever the process started); cron is read in the
route's time zone. Each route's fire times are moved by a stable offset, derived from a
hash of its name, so that a thousand routes on one schedule do not all log in at the
same second.

Cron across a DST change fires at every real instant whose wall time matches: a job for
02:30 in Europe/Berlin fires twice on the night the clocks go back (02:30 CEST and
02:30 CET) and once on the night they go forward, at 01:30 UTC (02:30 by the offset
before the change, 03:30 by the one after). Each fire is claimed separately, so each
still polls once across replicas.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

from worker.config.schedule import CronSpec, IntervalSpec, ScheduleSpec, build_trigger

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_OFFSET = timedelta(seconds=60)
# Cron's shortest gap is measured from a fixed Monday midnight, so the offset does not
# depend on when it is computed (the same reference as the health threshold's).
_REFERENCE = datetime(2026, 1, 5)
_GAP_FIRES = 10
# How far back `latest_fire` looks for a cron fire: `0 0 29 2 *` fires every four years,
# at worst eight (1896 to 1904, 2096 to 2104).
_LOOKBACK = timedelta(days=8 * 366 + 1)
_RESOLUTION = timedelta(seconds=1)  # cron fires on whole seconds


def route_offset(name: str, spec: ScheduleSpec) -> timedelta:
    """The route's offset: whole milliseconds in [0, min(interval / 2, 60 s)), the same
    in every process (SHA-256 of the name, not Python's salted `hash()`)."""
    cap = min(_shortest_gap(spec) / 2, MAX_OFFSET)
    cap_ms = cap // timedelta(milliseconds=1)
    if cap_ms <= 0:
        return timedelta(0)
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return timedelta(milliseconds=int.from_bytes(digest[:8], "big") % cap_ms)


def next_fire(spec: ScheduleSpec, after: datetime, offset: timedelta) -> datetime:
    """The first fire time strictly after `after`, in UTC."""
    _require_aware(after)
    if isinstance(spec, IntervalSpec):
        step = timedelta(seconds=spec.seconds)
        periods = (after - offset - EPOCH) // step
        return EPOCH + (periods + 1) * step + offset
    fire = _cron_at_or_after(_trigger(spec), after - offset + timedelta(microseconds=1))
    if fire is None:  # parse_schedule rejects a schedule that never fires
        raise ValueError(f"schedule {spec.text!r} has no fire time after {after.isoformat()}")
    return fire + offset


def latest_fire(spec: ScheduleSpec, now: datetime, offset: timedelta) -> datetime | None:
    """The last fire time at or before `now`, in UTC; None for a cron schedule that did
    not fire within the last eight years."""
    _require_aware(now)
    if isinstance(spec, IntervalSpec):
        step = timedelta(seconds=spec.seconds)
        return EPOCH + ((now - offset - EPOCH) // step) * step + offset
    base = now.astimezone(UTC) - offset
    fire = _latest_cron(_trigger(spec), base)
    return None if fire is None else fire + offset


def _latest_cron(trigger: Any, base: datetime) -> datetime | None:
    """Binary search for the latest fire at or before `base`: the fire at or after a
    moment is at or before `base` for every moment up to that fire, and after it for
    every later one. About thirty trigger calls, however dense or sparse the schedule."""

    def settled(moment: datetime) -> datetime | None:
        fire = _cron_at_or_after(trigger, moment)
        return fire if fire is not None and fire <= base else None

    low = base - _LOOKBACK
    if settled(low) is None:
        return None
    exact = settled(base)
    if exact is not None:
        return exact
    high = base  # invariant: settled(low) is a fire, settled(high) is None
    while high - low > _RESOLUTION:
        middle = low + (high - low) / 2
        if settled(middle) is None:
            high = middle
        else:
            low = middle
    return settled(low)


def _cron_at_or_after(trigger: Any, moment: datetime) -> datetime | None:
    # Handed over in UTC: APScheduler adds to a zoned "now" in wall-clock time, which
    # across the autumn change walks back into the repeated hour again and again.
    fire: datetime | None = trigger.get_next_fire_time(None, moment.astimezone(UTC))
    return None if fire is None else fire.astimezone(UTC)


def _trigger(spec: CronSpec) -> Any:
    return build_trigger(spec)


def _shortest_gap(spec: ScheduleSpec) -> timedelta:
    if isinstance(spec, IntervalSpec):
        return timedelta(seconds=spec.seconds)
    trigger = _trigger(spec)
    moment = _REFERENCE.replace(tzinfo=ZoneInfo(spec.timezone)).astimezone(UTC)
    fires: list[datetime] = []
    for _ in range(_GAP_FIRES):
        fire = _cron_at_or_after(trigger, moment)
        if fire is None:
            break
        fires.append(fire)
        moment = fire + timedelta(microseconds=1)
    gaps = [later - earlier for earlier, later in pairwise(fires)]
    # A schedule that fires once in a long while spreads over the full minute.
    return min(gaps, default=2 * MAX_OFFSET)


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone; fire times are absolute")
