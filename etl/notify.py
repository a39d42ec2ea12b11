"""systemd's notify protocol (sd_notify) over a unix datagram socket, standard library only.

With `NOTIFY_SOCKET` unset every call is a no-op, so the daemon runs the same in a terminal, a container
or under systemd. Addresses starting with `@` are Linux abstract sockets.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("etl.notify")


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other exotic forms are not supported


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to the service manager, if there is one."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _address(socket_path) if socket_path else None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._dropping = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw_usec.isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(raw_usec)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alive pings: half the manager's timeout, as sd_watchdog_enabled advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def send(self, *fields: str) -> bool:
        """Send one datagram of `KEY=value` lines. Never raises: the service must not die of this."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A manager that stopped reading must not hang the daemon (main loop and job alike).
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except BlockingIOError:
            if not self._dropping:
                self._dropping = True
                log.warning("notify_dropped", reason="the service manager's socket is full")
            return False
        except OSError as exc:
            log.warning("notify_failed", error=str(exc))
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.watchdog_usec is not None and self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading configuration")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
