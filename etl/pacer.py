"""The live path's pace: never more than `live.requests_per_minute` calls in any 60 s, and none before a
time the API asked us to wait for (`retry-after`, `anthropic-ratelimit-*`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime, timedelta

import structlog

from etl.clock import parse_iso

log = structlog.get_logger("etl.live")

WINDOW = timedelta(seconds=60)
PACING_SLICE = 0.25  # waits re-read the clock this often (tests move the clock instead of sleeping)


class Pacer:
    """Never more than `rpm` calls in any 60 s, and none before a time the API asked us to wait for.

    Shared by the worker's threads. Time comes from `clock`; waiting is done in slices of
    `PACING_SLICE` real seconds on `stop`, so a stop ends a wait at once.
    """

    def __init__(self, rpm: int, clock: Callable[[], datetime], stop: threading.Event) -> None:
        self.rpm = rpm
        self.clock = clock
        self.stop = stop
        self.sent: list[datetime] = []
        self.not_before: datetime | None = None
        self._lock = threading.Lock()

    def _ready_at(self, now: datetime) -> datetime:
        self.sent = [t for t in self.sent if t > now - WINDOW]
        ready = now
        if len(self.sent) >= self.rpm:
            ready = self.sent[len(self.sent) - self.rpm] + WINDOW
        if self.not_before is not None and self.not_before > ready:
            ready = self.not_before
        return ready

    def acquire(self) -> bool:
        """Wait for a turn; False when stopped first."""
        while True:
            with self._lock:
                now = self.clock()
                ready = self._ready_at(now)
                if ready <= now:
                    self.sent.append(now)
                    return True
            if self.stop.wait(min((ready - now).total_seconds(), PACING_SLICE)):
                return False

    def hold_until(self, when: datetime) -> None:
        with self._lock:
            if self.not_before is None or when > self.not_before:
                self.not_before = when
                log.info("live_paced", until=when.isoformat())

    def observe(self, headers: Mapping[str, str], now: datetime) -> None:
        """Honour the API's word: `retry-after`, and a `*-remaining: 0` until its `*-reset`."""
        retry_after = headers.get("retry-after")
        if retry_after:
            with suppress(ValueError):
                self.hold_until(now + timedelta(seconds=float(retry_after)))
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            if headers.get(f"anthropic-ratelimit-{kind}-remaining") == "0":
                reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
                with suppress(ValueError):
                    self.hold_until(parse_iso(reset) if reset else now + timedelta(seconds=1))
