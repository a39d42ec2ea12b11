"""Who owns what, and whether that owner is still alive.

Every process names itself once (`new_owner`): host, pid, a random tag, the boot id and the process's start
time in clock ticks. Leases, intents and `etl_runs` rows carry that name, so a process that finds one held
by another process can tell at once whether the holder still exists:

- **same host**: the holder is dead if the boot id differs (the machine rebooted) or no process with its pid
  and start time exists (a pid reused by another program has another start time). Costs a read of /proc.
- **PostgreSQL, any host**: a daemon on PostgreSQL holds a session advisory lock keyed on its name for its
  whole life (`:L` at the end of the name says so); the database drops the lock the moment the session
  dies, so any host sees the death at once (`etl.store.state.owner_lock_free`).
- **otherwise** (another host on SQLite, or a name without these facts): unknown; the lease runs out.

Owners seen dead are remembered with the time they were first seen so (`seen_dead`): a create call their
process may have had in flight has reached the API by then or never will, so the reconciler may release
such an intent after `submit.dead_owner_settle_seconds` rather than the full grace period.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from hashlib import blake2b

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
LOCK_SUFFIX = ":L"

_dead: dict[str, datetime] = {}
_dead_lock = threading.Lock()


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "-"


def start_ticks(pid: int) -> str | None:
    """The process's start time since boot (field 22 of /proc/<pid>/stat), None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"  # exists but unreadable: treat as alive
    return stat.rsplit(")", 1)[1].split()[19]


def new_owner(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}:{boot_id()}:{start_ticks(pid) or '-'}"


def with_lock(owner: str) -> str:
    return owner if owner.endswith(LOCK_SUFFIX) else owner + LOCK_SUFFIX


def holds_lock(owner: str | None) -> bool:
    return bool(owner) and str(owner).endswith(LOCK_SUFFIX)


def lock_key(owner: str) -> int:
    """The 64-bit advisory lock key of an owner's name."""
    return int.from_bytes(blake2b(owner.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    boot: str
    start: str


def parse(owner: str | None) -> Owner | None:
    if not owner:
        return None
    parts = owner.removesuffix(LOCK_SUFFIX).split(":")
    if len(parts) < 5 or not parts[1].isdigit():
        return None  # an older name (host:pid:tag): nothing to check it against
    return Owner(parts[0], int(parts[1]), parts[3], parts[4])


def local_verdict(owner: str | None) -> bool | None:
    """True: alive; False: known dead; None: cannot tell from this host."""
    o = parse(owner)
    if o is None or o.host != socket.gethostname():
        return None
    if o.boot != "-" and o.boot != boot_id():
        return False
    ticks = start_ticks(o.pid)
    if ticks is None:
        return False
    return not (o.start not in ("-", "?") and ticks not in ("?", o.start))


def note_dead(owner: str, now: datetime) -> datetime:
    """Remember that `owner` was seen dead at `now` (the first sighting is kept)."""
    with _dead_lock:
        return _dead.setdefault(owner, now)


def seen_dead(owner: str | None) -> datetime | None:
    if not owner:
        return None
    with _dead_lock:
        return _dead.get(owner)


def settled_after_death(owner: str | None, now: datetime, settle: timedelta) -> bool:
    """The owner is known dead and has been for `settle`: whatever it sent has reached the API by now."""
    since = seen_dead(owner)
    return since is not None and now - since >= settle
