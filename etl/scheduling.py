"""When jobs are due: pure functions of a cron expression, a time zone, the last recorded slot and `now`.

A *slot* is the instant (UTC) a cron expression names in its time zone, e.g. "00:00 Europe/Berlin on
31 March" = 2025-03-30T22:00Z. Slots identify runs in `etl_runs`, so every instance computes the same
slot for the same night, and the database's UNIQUE(job, slot) lets exactly one of them run it.

Daylight saving is handled here rather than by APScheduler's `CronTrigger` (3.11 skips the midnight
after a spring-forward night and repeats 02:30 on a fall-back night): the cron expression is evaluated
on naive wall-clock times and each wall time is then placed in the zone. A wall time that does not
exist (the spring gap) runs at the same offset as before the gap (02:30 -> 03:30 CEST); a wall time that
happens twice (the fall-back hour) runs at its first occurrence only. So every job runs once per night
whether the night is 23, 24 or 25 hours long.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

# How far back to look for the latest slot: covers weekly and monthly crons, not yearly ones.
LOOKBACK_WINDOWS = (timedelta(days=2), timedelta(days=9), timedelta(days=40), timedelta(days=370))
MAX_SLOTS = 100_000


WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_weekdays(field: str) -> str:
    """Crontab numbers weekdays from Sunday = 0 (and 7); APScheduler from Monday = 0: use names."""

    def convert(part: str) -> str:
        span, slash, step = part.partition("/")
        names = "-".join(WEEKDAYS[int(x) % 7] if x.isdigit() else x for x in span.split("-"))
        if names == "sun-sun" or span in ("0-7",):
            names = "*"
        return names + slash + step

    return ",".join(convert(p) for p in field.split(","))


@lru_cache(maxsize=32)
def _wall_trigger(cron: str) -> CronTrigger:
    """The cron expression evaluated on a clock without daylight saving (naive wall time as UTC)."""
    minute, hour, day, month, weekday = cron.split()
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_weekdays(weekday), timezone=UTC
    )


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """`instant`'s local wall time in `zone`, expressed as a fake-UTC datetime for the wall trigger."""
    return instant.astimezone(zone).replace(tzinfo=UTC, fold=0)


def _place(wall: datetime, zone: ZoneInfo) -> datetime:
    """The real instant of a wall time: fold=0 gives the first of a repeated hour and, for a time in
    the spring gap, the offset in force before the gap."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def fire_times(cron: str, zone: ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """Every slot in (after, until], ascending, as UTC instants."""
    trigger = _wall_trigger(cron)
    # Wall clocks can be up to a few hours away from the instants: scan a margin either side.
    cursor = _wall(after, zone) - timedelta(hours=3)
    end_wall = _wall(until, zone) + timedelta(hours=3)
    found: list[datetime] = []
    seen: set[datetime] = set()
    while len(found) < MAX_SLOTS:
        wall = trigger.get_next_fire_time(None, cursor)
        if wall is None or wall > end_wall:
            break
        cursor = wall + timedelta(seconds=1)
        instant = _place(wall, zone)
        if after < instant <= until and instant not in seen:
            seen.add(instant)
            found.append(instant)
    found.sort()
    return found


def next_fire(cron: str, zone: ZoneInfo, after: datetime) -> datetime | None:
    """The first slot strictly after `after`."""
    for window in LOOKBACK_WINDOWS:
        times = fire_times(cron, zone, after, after + window)
        if times:
            return times[0]
    return None


def latest_fire(cron: str, zone: ZoneInfo, now: datetime) -> datetime | None:
    """The most recent slot at or before `now` (None if there is none within a year)."""
    for window in LOOKBACK_WINDOWS:
        times = fire_times(cron, zone, now - window, now)
        if times:
            return times[-1]
    return None


def due_slots(cron: str, zone: ZoneInfo, last_slot: datetime | None, now: datetime) -> list[datetime]:
    """Slots after the last recorded one up to `now`: what was missed. Empty when nothing was recorded
    yet (a new installation waits for its first slot instead of running at once)."""
    if last_slot is None:
        return []
    return fire_times(cron, zone, last_slot, now)


def catch_up_slot(cron: str, zone: ZoneInfo, last_slot: datetime | None, now: datetime) -> datetime | None:
    """The one slot to run at start-up: the latest missed one. Two missed nights run once, not twice."""
    if last_slot is None:
        return None
    latest = latest_fire(cron, zone, now)
    if latest is None or latest <= last_slot:
        return None
    return latest


def next_poll_delay(current: float | None, pending: bool, base: float, maximum: float) -> float:
    """Seconds until the next poll: `base` while batches are pending, doubling up to `maximum` when idle."""
    if pending or current is None:
        return base
    return min(max(current, base) * 2, maximum)


class SlotTrigger(BaseTrigger):  # type: ignore[misc]
    """An APScheduler trigger that fires on this module's slots.

    `offset` shifts the daemon's notion of now from the wall clock (ETL_CLOCK_OFFSET_SECONDS in tests
    and the demo); APScheduler itself keeps using the real clock.
    """

    __slots__ = ("cron", "offset", "zone")

    def __init__(self, cron: str, zone: ZoneInfo, offset: timedelta = timedelta(0)) -> None:
        self.cron = cron
        self.zone = zone
        self.offset = offset

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        if previous_fire_time is None:  # a slot exactly at `now` is still to come
            after = now.astimezone(UTC) - timedelta(microseconds=1)
        else:
            after = previous_fire_time.astimezone(UTC)
        slot = next_fire(self.cron, self.zone, after + self.offset)
        return None if slot is None else slot - self.offset

    def __str__(self) -> str:
        return f"slots[{self.cron} {self.zone.key}]"

    def __getstate__(self) -> dict[str, Any]:
        return {"cron": self.cron, "zone": self.zone.key, "offset": self.offset.total_seconds()}
