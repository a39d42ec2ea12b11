"""Named failpoints for crash tests: `ETL_FAILPOINTS="submit.after_create=kill"` makes the process
SIGKILL itself the first time it passes that point.

Syntax: comma-separated `name=action[@n]`; actions `kill` (SIGKILL), `stop` (SIGSTOP, for pause
tests), `raise` (an exception, for in-process tests); `@n` fires on the n-th pass (default 1).
Configured once from the environment by the CLI; a no-op when unset.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Mapping

ENV = "ETL_FAILPOINTS"

POINTS = (
    "submit.after_claim",  # rows claimed into an intent, nothing built
    "submit.after_build",  # request body built, intent not yet fenced
    "submit.after_fence",  # intent is `sending`, create not sent
    "submit.during_create",  # create sent; crash before the response is read
    "submit.after_create",  # API accepted the batch; id not yet committed
    "submit.after_record",  # id committed, rows not yet moved on
    "collect.after_retrieve",  # batch seen ended, nothing downloaded
    "collect.mid_stream",  # part of the results applied, rest not read
    "collect.after_warehouse",  # a chunk written to the warehouse, queue rows not yet marked
    "collect.before_mark_collected",  # everything applied, batch not yet marked collected
    "requeue.after_requeue",  # failed rows re-queued in a chunk, chunk's events not yet counted
    "reconcile.after_list",  # remote list read, nothing adopted
    "reconcile.after_adopt",  # an unknown intent adopted, next one not looked at
    "reconcile.after_release",  # an intent released back to the queue
)


class FailpointHit(Exception):
    pass


_armed: dict[str, tuple[str, int]] = {}
_hits: Counter[str] = Counter()


def configure(env: Mapping[str, str]) -> None:
    _armed.clear()
    _hits.clear()
    spec = env.get(ENV, "").strip()
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        action, _, nth = (action or "kill").partition("@")
        if name not in POINTS:
            raise ValueError(f"unknown failpoint {name!r} in {ENV}; known: {', '.join(POINTS)}")
        if action not in ("kill", "stop", "raise"):
            raise ValueError(f"failpoint {name}: action must be kill, stop or raise, not {action!r}")
        _armed[name] = (action, int(nth or 1))


def armed(name: str) -> bool:
    return name in _armed


def hit(name: str) -> None:
    if not _armed:
        return
    armed = _armed.get(name)
    if armed is None:
        return
    _hits[name] += 1
    action, nth = armed
    if _hits[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        # To this thread, not the process: a process-directed SIGSTOP is taken by the main thread, and the
        # thread that passed the point (a daemon job runs on a pool thread) could go on until the group
        # stop reaches it, far enough under load to send the create that "after_fence" promises is unsent.
        # A thread-directed stop is taken on the way out of this call, so this thread stops here.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    else:
        raise FailpointHit(name)
