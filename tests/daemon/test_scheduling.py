"""Scheduling decisions as pure functions of (cron, zone, last slot, now): no clock, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from etl.scheduling import (
    SlotTrigger,
    catch_up_slot,
    due_slots,
    fire_times,
    latest_fire,
    next_fire,
    next_poll_delay,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def local(zone: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=zone).astimezone(UTC)  # type: ignore[misc]


# (zone, the local date of a DST change, the length of that night in hours)
DST_NIGHTS = [
    (BERLIN, (2025, 3, 30), 23),
    (BERLIN, (2025, 10, 26), 25),
    (NEW_YORK, (2025, 3, 9), 23),
    (NEW_YORK, (2025, 11, 2), 25),
]


@pytest.mark.parametrize(("zone", "day", "hours"), DST_NIGHTS)
@pytest.mark.parametrize("cron", ["0 0 * * *", "0 7 * * *", "30 2 * * *", "0 1 * * *", "0 3 * * *"])
def test_each_job_runs_once_per_day_across_dst_changes(
    zone: ZoneInfo, day: tuple[int, int, int], hours: int, cron: str
) -> None:
    """Spring-forward (23 h) and fall-back (25 h) days: one slot per local day, never zero, never two."""
    start = local(zone, *day, 12, 0) - timedelta(days=2)
    slots = fire_times(cron, zone, start, start + timedelta(days=4))
    local_days = [s.astimezone(zone).date() for s in slots]
    assert len(slots) == 4
    assert len(set(local_days)) == 4, slots


def test_the_midnight_after_a_short_night_is_not_skipped() -> None:
    """APScheduler 3.11's CronTrigger skips it; our slots do not."""
    start = local(BERLIN, 2025, 3, 30, 0, 0)
    assert next_fire("0 0 * * *", BERLIN, start) == local(BERLIN, 2025, 3, 31, 0, 0)
    assert next_fire("0 0 * * *", BERLIN, start) - start == timedelta(hours=23)


def test_a_time_in_the_spring_gap_runs_right_after_the_gap() -> None:
    slots = fire_times(
        "30 2 * * *", BERLIN, local(BERLIN, 2025, 3, 29, 12, 0), local(BERLIN, 2025, 3, 30, 12, 0)
    )
    assert [s.astimezone(BERLIN).strftime("%H:%M %Z") for s in slots] == ["03:30 CEST"]


def test_a_repeated_hour_runs_at_its_first_occurrence_only() -> None:
    slots = fire_times(
        "30 2 * * *", BERLIN, local(BERLIN, 2025, 10, 25, 12, 0), local(BERLIN, 2025, 10, 26, 12, 0)
    )
    assert len(slots) == 1
    assert slots[0] == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)  # 02:30 CEST, before the clocks go back


def test_catch_up_runs_the_latest_missed_slot_once() -> None:
    last = local(BERLIN, 2025, 6, 1, 0, 0)
    now = local(BERLIN, 2025, 6, 3, 9, 15)  # down for two nights
    assert len(due_slots("0 0 * * *", BERLIN, last, now)) == 2
    assert catch_up_slot("0 0 * * *", BERLIN, last, now) == local(BERLIN, 2025, 6, 3, 0, 0)


def test_catch_up_has_nothing_to_do_when_no_slot_was_missed() -> None:
    last = local(BERLIN, 2025, 6, 3, 0, 0)
    now = local(BERLIN, 2025, 6, 3, 23, 59)
    assert due_slots("0 0 * * *", BERLIN, last, now) == []
    assert catch_up_slot("0 0 * * *", BERLIN, last, now) is None


def test_a_new_installation_waits_for_its_first_slot() -> None:
    assert catch_up_slot("0 0 * * *", BERLIN, None, local(BERLIN, 2025, 6, 3, 9, 0)) is None


def test_latest_fire_finds_weekly_slots() -> None:
    now = local(BERLIN, 2025, 6, 5, 12, 0)  # a Thursday
    assert latest_fire("0 0 * * 1", BERLIN, now) == local(BERLIN, 2025, 6, 2, 0, 0)


def test_weekdays_follow_crontab_numbering() -> None:
    """0 and 7 are Sunday, 1 is Monday (APScheduler's own numbering starts at Monday = 0)."""
    week = fire_times(
        "0 0 * * 1-5", BERLIN, local(BERLIN, 2025, 6, 1, 12, 0), local(BERLIN, 2025, 6, 8, 12, 0)
    )
    assert [s.astimezone(BERLIN).strftime("%a") for s in week] == ["Mon", "Tue", "Wed", "Thu", "Fri"]
    sundays = fire_times(
        "0 0 * * 0,7", BERLIN, local(BERLIN, 2025, 6, 1, 12, 0), local(BERLIN, 2025, 6, 15, 12, 0)
    )
    assert [s.astimezone(BERLIN).strftime("%a %d") for s in sundays] == ["Sun 08", "Sun 15"]


def test_slot_exactly_now_counts_as_due() -> None:
    slot = local(BERLIN, 2025, 6, 3, 7, 0)
    assert latest_fire("0 7 * * *", BERLIN, slot) == slot


def test_poll_backs_off_while_idle_and_resets_when_work_appears() -> None:
    base, top = 1800.0, 4 * 3600.0
    delays = [next_poll_delay(None, False, base, top)]
    for _ in range(5):
        delays.append(next_poll_delay(delays[-1], False, base, top))
    assert delays == [1800, 3600, 7200, 14400, 14400, 14400]
    assert next_poll_delay(14400, True, base, top) == base


def test_slot_trigger_fires_on_slots_and_honours_the_clock_offset() -> None:
    trigger = SlotTrigger("0 0 * * *", BERLIN)
    now = local(BERLIN, 2025, 3, 30, 10, 0)
    first = trigger.get_next_fire_time(None, now)
    assert first == local(BERLIN, 2025, 3, 31, 0, 0)
    assert trigger.get_next_fire_time(first, first) == local(BERLIN, 2025, 4, 1, 0, 0)
    shifted = SlotTrigger("0 0 * * *", BERLIN, offset=timedelta(hours=1))
    assert shifted.get_next_fire_time(None, now) == local(BERLIN, 2025, 3, 31, 0, 0) - timedelta(hours=1)
