"""The one place that reads the wall clock. Everything else takes `now` as an argument."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

OFFSET_ENV = "ETL_CLOCK_OFFSET_SECONDS"


def utcnow() -> datetime:
    """Current time, timezone-aware UTC.

    ``ETL_CLOCK_OFFSET_SECONDS`` shifts it: the tests and the demo move the emulator's virtual clock
    forward and start `etl` processes with the same offset, so both sides agree on the date without
    anyone sleeping.
    """
    now = datetime.now(UTC)
    offset = os.environ.get(OFFSET_ENV)
    if offset:
        now += timedelta(seconds=float(offset))
    return now


def ensure_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def isoformat(value: datetime | None) -> str | None:
    return None if value is None else ensure_utc(value).isoformat().replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return ensure_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


def wall() -> datetime:
    """The wall clock itself, unshifted: the time APScheduler keeps (the daemon converts between them)."""
    return datetime.now(UTC)


def never() -> bool:
    """A `should_stop` for work that nothing asks to stop."""
    return False
