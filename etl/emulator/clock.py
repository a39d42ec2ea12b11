"""The emulator's virtual clock and its RFC 3339 timestamps.

Virtual time = the start time (wall clock at start, or a configured instant) + real time elapsed since
start (monotonic) + every advance made through ``POST /_emulator/clock``. Batch state is evaluated
lazily against it, so tests move a batch through its whole life by advancing the clock, never by sleeping.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta


def format_time(value: datetime) -> str:
    """RFC 3339 with microseconds and ``Z``, as the API writes timestamps."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset) into an aware UTC datetime."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class VirtualClock:
    """Wall (or configured) start + real elapsed time + total advance. Thread-safe."""

    def __init__(self, start: datetime | None = None, advanced: float = 0.0) -> None:
        self._start = (start or datetime.now(UTC)).astimezone(UTC)
        self._mono0 = time.monotonic()
        self._advanced = advanced
        self._lock = threading.Lock()

    @property
    def advanced_seconds(self) -> float:
        """Total seconds added by :meth:`advance` (persisted across restarts with the state file)."""
        with self._lock:
            return self._advanced

    def now(self) -> datetime:
        with self._lock:
            offset = time.monotonic() - self._mono0 + self._advanced
        return self._start + timedelta(seconds=offset)

    def advance(self, seconds: float) -> datetime:
        """Move virtual time forward (never backward) and return the new now."""
        if seconds < 0:
            raise ValueError(f"advance_seconds must be >= 0, got {seconds}")
        with self._lock:
            self._advanced += seconds
        return self.now()

    def reset(self) -> None:
        """Drop every advance; real elapsed time keeps counting."""
        with self._lock:
            self._advanced = 0.0
