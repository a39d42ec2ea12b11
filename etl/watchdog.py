"""Whether the daemon's job is making progress, for the systemd watchdog: the main loop pings it only
while the job running now has committed a transaction, or asked whether to stop, within the stall limit."""

from __future__ import annotations

import threading
import time
from typing import Any

from etl import config as config_mod

STALL_ENV = "ETL_DAEMON_STALL_SECONDS"  # a job silent this long stops the watchdog pings
STALL_MARGIN = 60.0  # beyond the longest single call a job may wait on (see `default_stall`)


def default_stall(cfg: config_mod.Config) -> float:
    """How long a job may go without progress (a database commit, or asking whether to stop) before the
    watchdog pings stop: the longest call it can legitimately wait on, plus a margin."""
    longest = max(
        cfg.submit.create_timeout_seconds, cfg.collect.stream_timeout_seconds, cfg.api_timeout_seconds
    )
    return longest + STALL_MARGIN


class Watchdog:
    def __init__(self, stall_limit: float, stop: threading.Event) -> None:
        self.stall_limit = stall_limit
        self.stop = stop
        self.current: str | None = None  # the job running now, if any
        self.progress_at = time.monotonic()
        self._idle = threading.Event()
        self._idle.set()

    def should_stop(self) -> bool:
        self.progress_at = time.monotonic()  # the jobs ask between batches: that is their heartbeat
        return self.stop.is_set()

    def on_commit(self, _conn: Any) -> None:
        # Every transaction a job commits (a claim, a chunk of results, a claim's lease renewal) is progress.
        # A job stuck on a socket or a lock commits nothing, and the watchdog pings stop (`making_progress`).
        # The main loop's own commits (the leader lease) say nothing about the job: they do not count.
        if threading.current_thread() is not threading.main_thread():
            self.progress_at = time.monotonic()

    def enter(self, job: str) -> None:
        self.current = job
        self.progress_at = time.monotonic()
        self._idle.clear()

    def leave(self) -> None:
        self.current = None
        self._idle.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the job running now to end; False if it is still running after `timeout`."""
        return self._idle.wait(timeout)

    def silent_seconds(self) -> float:
        return time.monotonic() - self.progress_at

    def making_progress(self) -> bool:
        return self.current is None or self.silent_seconds() < self.stall_limit
