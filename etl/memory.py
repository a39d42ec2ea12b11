"""Garbage collection paused while a batch is built or collected."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_gc_lock = threading.Lock()
_gc_pauses = 0  # jobs running inside `gc_paused` (the daemon may run a submit and a collect at once)
_gc_was_enabled = [True]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is built or collected.

    A batch makes hundreds of thousands of short-lived dicts and strings, freed by reference counting;
    with the collector on, each few thousand allocations trigger a scan, and the older generations (the
    batch's expected rows, everything imported) are scanned again and again: 1.3 s of an 8.5 s
    `etl collect` of 100,000 results, 1 s of a 13 s `etl submit` (bench/RESULTS.md). The few cycles a
    batch makes are collected when the collector runs again after it.
    """
    global _gc_pauses
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled[0] = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled[0]:
                gc.enable()
