"""The daemon's signals: SIGTERM/SIGINT ask for a stop (a second one exits at once), SIGHUP for a reload
of the configuration file. Any of them ends the main loop's sleep early."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
from types import FrameType


class Signals:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._count = 0
        self._wake = threading.Event()  # set by any signal: ends the main loop's sleep early
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    def on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._count += 1
        if self._count > 1:
            # A second signal: the operator insists. Everything is resumable from the database.
            os.write(2, b"etl: second stop signal, exiting now\n")
            os._exit(130)
        self.stop.set()
        self._wake.set()

    def on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload.set()
        self._wake.set()

    def install(self) -> None:
        # A signal may be delivered to any thread (the job thread, the scheduler's); Python runs the
        # handler in the main thread only when that thread wakes up. The wakeup fd makes it wake up.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_hup)

    def sleep(self, seconds: float) -> None:
        """Up to `seconds`, or until a signal arrives."""
        if self._wake_r is None:
            self._wake.wait(seconds)
        else:
            select.select([self._wake_r], [], [], seconds)
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(512):
                    pass
        self._wake.clear()
