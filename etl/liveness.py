"""Who owns what, and whether that owner is still alive.

Every process names itself once (`new_owner`):
`host:pid:token:boot:start:pidns:machine`, then `:L` or `:F` once it holds a proof of life (etl.life).

- host: for people only; a hostname proves nothing (containers with host networking and cloned VMs
  share one).
- pid and start: the process and its start time in clock ticks since boot (a reused pid has another).
- token: 16 random hex digits, new in every process; names its lock file.
- boot: the kernel's boot id; pidns: the inode of the PID namespace (/proc/self/ns/pid); machine:
  /etc/machine-id. A pid means something only inside one PID namespace of one running kernel.

Whether an owner is dead (etl.recovery.owner_dead), in this order:
1. **its proof of life** (`:L`: the PostgreSQL advisory lock keyed on its name; `:F`: its `flock` beside
   the SQLite database): held means alive, whatever anything else says;
2. **/proc, only where the pid means the same thing**: same boot id, same PID namespace and same
   machine id as ours; then no such pid, or another start time, is death;
3. a free lock with nothing local to contradict it is death; anything else is unknown: the lease runs out.

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
PID_NS_PATH = "/proc/self/ns/pid"
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
LOCK_SUFFIX = ":L"  # holds a PostgreSQL session advisory lock keyed on its name
FLOCK_SUFFIX = ":F"  # holds a flock on its token's file beside the SQLite database

_dead: dict[str, datetime] = {}
_dead_lock = threading.Lock()


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "-"


def pid_namespace() -> str:
    """The inode of this process's PID namespace ('-' if /proc cannot say)."""
    try:
        link = os.readlink(PID_NS_PATH)  # "pid:[4026531836]"
    except OSError:
        return "-"
    return link[link.find("[") + 1 : link.rfind("]")] or "-"


def machine_id() -> str:
    for path in MACHINE_ID_PATHS:
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()[:12]
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
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
    return (
        f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:16]}:{boot_id()}:{start_ticks(pid) or '-'}"
        f":{pid_namespace()}:{machine_id()}"
    )


def _bare(owner: str) -> str:
    while owner.endswith((LOCK_SUFFIX, FLOCK_SUFFIX)):
        owner = owner[:-2]
    return owner


def with_lock(owner: str) -> str:
    return owner if owner.endswith(LOCK_SUFFIX) else _bare(owner) + LOCK_SUFFIX


def with_flock(owner: str) -> str:
    return owner if owner.endswith(FLOCK_SUFFIX) else _bare(owner) + FLOCK_SUFFIX


def holds_lock(owner: str | None) -> bool:
    return bool(owner) and str(owner).endswith(LOCK_SUFFIX)


def holds_flock(owner: str | None) -> bool:
    return bool(owner) and str(owner).endswith(FLOCK_SUFFIX)


def token_of(owner: str) -> str:
    """The random per-process token (names the owner's lock file); '' for a name without one."""
    parts = _bare(owner).split(":")
    token = parts[2] if len(parts) >= 7 else ""
    return token if token.isalnum() else ""


def lock_key(owner: str) -> int:
    """The 64-bit advisory lock key of an owner's name."""
    return int.from_bytes(blake2b(owner.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    boot: str
    start: str
    pidns: str | None = None  # None: a name from before issue 20 (host:pid:tag:boot:start)
    machine: str | None = None


def parse(owner: str | None) -> Owner | None:
    if not owner:
        return None
    parts = _bare(owner).split(":")
    if len(parts) < 5 or not parts[1].isdigit():
        return None  # an older name (host:pid:tag): nothing to check it against
    if len(parts) >= 7:
        return Owner(parts[0], int(parts[1]), parts[3], parts[4], parts[5], parts[6])
    return Owner(parts[0], int(parts[1]), parts[3], parts[4])


def local_verdict(owner: str | None) -> bool | None:
    """True: alive; False: known dead; None: cannot tell from here.

    Only where a pid means the same thing as here: the same running kernel (boot id), the same PID
    namespace and the same machine id. A hostname proves nothing: two containers with host networking,
    or two cloned VMs, share one while their pids name different processes."""
    o = parse(owner)
    if o is None or o.pidns is None or "-" in (o.boot, o.pidns, o.machine):
        return None
    if (o.boot, o.pidns, o.machine) != (boot_id(), pid_namespace(), machine_id()):
        return None
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
